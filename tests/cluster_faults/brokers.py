"""The two clusters the matrix runs against, behind one interface:

    start()             start 3 fresh nodes and form the cluster (blocks until ready)
    kill9(i) / pause(i) / resume(i) / restart(i)
    running(i)          process alive (not killed)
    ensure_up()         restart killed nodes, SIGCONT paused ones, wait until serving
    queue_leader(q)     index of the queue's leader node (None if unknown)
    stop()              kill everything (also on error / Ctrl-C)
    amqp(i), http(i)    (host, port) of node i's listeners, reachable from the harness

Each node runs in its own network namespace (net.Net), in its own session/process
group, so a kill -9 or SIGSTOP hits every OS process of the node at once."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import base64

AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def http_get(host, port, path, timeout=2.0):
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers={"Authorization": AUTH})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode() or "null")


class Node:
    def __init__(self, i, name, ip, dir):
        self.i, self.name, self.ip, self.dir = i, name, ip, dir
        self.proc = None
        self.paused = False
        self.runs = 0

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class Cluster:
    name = "?"

    def __init__(self, net, workdir, log):
        self.net, self.workdir, self.log = net, workdir, log
        self.nodes = []

    # ---------------------------------------------------------------- process faults
    def kill9(self, i):
        node = self.nodes[i]
        node.signal(signal.SIGCONT if node.paused else 0)
        node.signal(signal.SIGKILL)
        if node.proc is not None:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        node.proc, node.paused = None, False

    def pause(self, i):
        self.nodes[i].signal(signal.SIGSTOP)
        self.nodes[i].paused = True

    def resume(self, i):
        self.nodes[i].signal(signal.SIGCONT)
        self.nodes[i].paused = False

    def running(self, i):
        return self.nodes[i].alive()

    def stop(self):
        for n in self.nodes:
            if n.proc is not None:
                n.signal(signal.SIGCONT)
                n.signal(signal.SIGKILL)
                try:
                    n.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                n.proc = None
        # Daemons a node forked out of its process group (RabbitMQ's epmd) live in
        # its namespace: every process in our namespaces is ours.
        for ns in self.net.ns:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        # Until they are gone: a dying beam.smp still holds its ports (25672 is
        # also Switchyard's peer port), and the next cluster binds them at once.
        deadline = time.time() + 15
        while time.time() < deadline and any(
                subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
                for ns in self.net.ns):
            time.sleep(0.2)

    def ensure_up(self, timeout=120, suspects=()):
        for i, n in enumerate(self.nodes):
            if n.paused:
                self.resume(i)
        dead = [i for i in range(len(self.nodes)) if not self.nodes[i].alive()]
        self.start_nodes(dead)
        try:
            self.wait_serving(min(timeout, 45))
        except RuntimeError:
            if not suspects:
                raise
            # A node cut off (or paused) for longer than net_ticktime stays
            # partitioned under pause_minority: restart the side that was cut
            # off, RabbitMQ's advice (docs/partitions.md), then wait again.
            self.log(f"{self.name}: not all nodes serving after the heal; restarting {list(suspects)}")
            self.restart_app(list(suspects))
            self.wait_serving(timeout)

    def restart_app(self, idxs):
        for i in idxs:
            self.kill9(i)
        self.start_nodes(idxs)

    def amqp(self, i):
        return (self.nodes[i].ip, 5672)

    def http(self, i):
        return (self.nodes[i].ip, 15672)

    def index_of(self, name):
        for n in self.nodes:
            if name in (n.name, n.ip) or (isinstance(name, str) and name.endswith("@" + n.ip)):
                return n.i
        return None


class Switchyard(Cluster):
    name = "switchyard"

    def __init__(self, net, workdir, log, binary, repo, cluster_extra="", bind_any=False):
        super().__init__(net, workdir, log)
        self.binary, self.repo = binary, repo
        self.cluster_extra = cluster_extra  # more [cluster] keys, e.g. "write_timeout_ms = 3000"
        # Listeners on 0.0.0.0 of the namespace (also 127.0.0.1, for loopback-only
        # tools such as switchyard-perf run inside it) instead of the node's address.
        self.bind_any = bind_any

    def start(self):
        shutil.rmtree(self.workdir, ignore_errors=True)
        base = open(os.path.join(self.repo, "config.toml")).read()
        names = [f"n{i + 1}" for i in range(self.net.n)]
        seeds = ", ".join(f'"{n}@{ip}:25672"' for n, ip in zip(names, self.net.ips))
        self.nodes = []
        for i, (name, ip) in enumerate(zip(names, self.net.ips)):
            d = os.path.join(self.workdir, name)
            os.makedirs(d)
            text = re.sub(r'^data_dir = .*$', f'data_dir = "{d}/data"', base, flags=re.M)
            if not self.bind_any:
                text = text.replace('"0.0.0.0:', f'"{ip}:')
            text = text.replace("loopback_only = true", "loopback_only = false")
            text += f'\n[cluster]\nnode = "{name}"\nlisten = "{ip}:25672"\nseeds = [{seeds}]\n'
            if self.cluster_extra:
                text += self.cluster_extra.replace(";", "\n") + "\n"
            open(os.path.join(d, "config.toml"), "w").write(text)
            self.nodes.append(Node(i, name, ip, d))
        self.start_nodes(range(len(self.nodes)))
        self.wait_serving(60)

    def start_nodes(self, idxs):
        for i in idxs:
            n = self.nodes[i]
            n.runs += 1
            ready = os.path.join(n.dir, f"ready-{n.runs}.json")
            logf = open(os.path.join(n.dir, f"node-{n.runs}.log"), "w")
            cmd = self.net.exec_prefix(i) + [self.binary, "--config", os.path.join(n.dir, "config.toml"),
                                              "--ready-file", ready]
            env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
            n.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf, env=env,
                                      start_new_session=True)
            n.ready = ready
        for i in idxs:
            n = self.nodes[i]
            deadline = time.time() + 30
            while not os.path.exists(n.ready):
                if n.proc.poll() is not None:
                    raise RuntimeError(f"switchyard {n.name} exited: see {n.dir}/node-{n.runs}.log")
                if time.time() > deadline:
                    raise RuntimeError(f"switchyard {n.name} not ready after 30 s")
                time.sleep(0.05)

    def wait_serving(self, timeout):
        """Every node answers /api/nodes and agrees on a metadata leader."""
        deadline = time.time() + timeout
        while True:
            try:
                leaders = set()
                for i in range(len(self.nodes)):
                    leaders.add(self.meta_leader(i))
                if len(leaders) == 1 and None not in leaders:
                    return
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError("switchyard cluster: no agreed leader")
            time.sleep(0.3)

    def meta_leader(self, via):
        """The metadata leader as node `via` sees it: the member whose `cluster.leader` is true."""
        for node in http_get(*self.http(via), "/api/nodes"):
            c = node.get("cluster") or {}
            if c.get("leader") is True:
                return self.index_of(node.get("name"))
        return None

    def queue_leader(self, q, avoid=()):
        for i in sorted(range(len(self.nodes)), key=lambda i: i in avoid):
            if not self.running(i) or self.nodes[i].paused:
                continue
            try:
                info = http_get(*self.http(i), "/api/queues/%2F/" + urllib.parse.quote(q, safe=""))
                if isinstance(info, dict) and info.get("leader"):
                    return self.index_of(info["leader"])
                return self.meta_leader(i)
            except Exception:
                continue
        return None

    def logs(self):
        return [os.path.join(n.dir, f) for n in self.nodes for f in sorted(os.listdir(n.dir)) if f.endswith(".log")]


RABBIT_BIN = "/usr/lib/rabbitmq/bin"


class RabbitMQ(Cluster):
    name = "rabbitmq"

    def __init__(self, net, workdir, log, mqtt=False):
        super().__init__(net, workdir, log)
        self.plugins = ["rabbitmq_management"] + (["rabbitmq_mqtt"] if mqtt else [])

    def env(self, i):
        n = self.nodes[i]
        return dict(os.environ, HOME=n.dir, RABBITMQ_NODENAME=n.name, RABBITMQ_USE_LONGNAME="true",
                    RABBITMQ_CONFIG_FILE=os.path.join(n.dir, "rabbitmq.conf"),
                    RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(n.dir, "enabled_plugins"),
                    RABBITMQ_MNESIA_BASE=os.path.join(n.dir, "mnesia"),
                    RABBITMQ_LOG_BASE=os.path.join(n.dir, "log"),
                    RABBITMQ_PID_FILE=os.path.join(n.dir, "pid"))

    def ctl(self, i, *args, tool="rabbitmqctl", timeout=90, check=True):
        cmd = self.net.exec_prefix(i) + ["timeout", str(timeout), os.path.join(RABBIT_BIN, tool),
                                         "-n", self.nodes[i].name, *args]
        r = subprocess.run(cmd, env=self.env(i), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.nodes[i].name}: {r.stdout[-300:]} {r.stderr[-300:]}")
        return r.stdout

    def start(self):
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.nodes = []
        for i, ip in enumerate(self.net.ips):
            d = os.path.join(self.workdir, f"n{i + 1}")
            os.makedirs(os.path.join(d, "log"))
            os.makedirs(os.path.join(d, "mnesia"))
            cookie = os.path.join(d, ".erlang.cookie")
            open(cookie, "w").write("CLUSTERFAULTSCOOKIE")
            os.chmod(cookie, 0o400)
            open(os.path.join(d, "rabbitmq.conf"), "w").write(
                "loopback_users = none\n"
                "listeners.tcp.default = 5672\n"
                "management.tcp.port = 15672\n"
                # RabbitMQ's recommendation for 3 nodes (docs/partitions.md).
                "cluster_partition_handling = pause_minority\n")
            open(os.path.join(d, "enabled_plugins"), "w").write(f"[{','.join(self.plugins)}].\n")
            self.nodes.append(Node(i, f"rabbit@{ip}", ip, d))
        self.start_nodes(range(len(self.nodes)))
        for i in range(1, len(self.nodes)):
            self.ctl(i, "stop_app")
            self.ctl(i, "join_cluster", self.nodes[0].name)
            self.ctl(i, "start_app")
        self.wait_serving(120)

    def start_nodes(self, idxs):
        idxs = list(idxs)
        for i in idxs:
            n = self.nodes[i]
            n.runs += 1
            try:
                os.unlink(os.path.join(n.dir, "pid"))
            except FileNotFoundError:
                pass
            out = open(os.path.join(n.dir, f"stdout-{n.runs}.log"), "w")
            n.proc = subprocess.Popen(self.net.exec_prefix(i) + [os.path.join(RABBIT_BIN, "rabbitmq-server")],
                                      env=self.env(i), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        for i in idxs:
            try:
                self.ctl(i, "wait", os.path.join(self.nodes[i].dir, "pid"), "--timeout", "120", timeout=130)
            except RuntimeError:
                if self.nodes[i].alive() or getattr(self, "restarted_after_failure", 0) >= 2:
                    raise
                # Seen once after kill-all (3.10.8): a node booting while its peers boot
                # dies in the feature-flag sync (incompatible_feature_flags, badmap).
                # Start it once more, now that the others are up; the run records it.
                self.log(f"rabbitmq: {self.nodes[i].name} died while starting; starting it again")
                self.restarted_after_failure = getattr(self, "restarted_after_failure", 0) + 1
                self.start_nodes([i])

    def wait_serving(self, timeout):
        deadline = time.time() + timeout
        while True:
            try:
                ok = 0
                for i in range(len(self.nodes)):
                    nodes = http_get(*self.http(i), "/api/nodes")
                    ok += sum(1 for x in nodes if x.get("running")) == len(self.nodes)
                if ok == len(self.nodes):
                    return
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError("rabbitmq cluster: not all nodes running")
            time.sleep(0.5)

    def queue_leader(self, q, avoid=()):
        # rabbitmq-queues quorum_status asks Ra itself (the management API's
        # `leader` comes from the queue record, which can lag).
        for i in sorted(range(len(self.nodes)), key=lambda i: i in avoid):
            if not self.running(i) or self.nodes[i].paused:
                continue
            try:
                out = self.ctl(i, "quorum_status", q, "--formatter", "json", tool="rabbitmq-queues", timeout=20)
                for row in json.loads(out[out.index("["):]):
                    if str(row.get("Raft State", "")).lower() == "leader":
                        return self.index_of(row.get("Node Name"))
            except Exception:
                continue
        return None

    def logs(self):
        out = []
        for n in self.nodes:
            ld = os.path.join(n.dir, "log")
            out += [os.path.join(ld, f) for f in sorted(os.listdir(ld))] if os.path.isdir(ld) else []
        return out

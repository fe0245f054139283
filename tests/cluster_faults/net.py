"""Network namespaces for the fault matrix: one namespace per broker node, each
with a veth into a bridge in the root namespace, so every node has its own IP
(10.213.0.11, .12, .13) and dials its peers from it; the harness (clients) talks
to the nodes from the bridge's 10.213.0.1. Partitions are iptables DROP rules
inside the node namespaces, matched on the peer's IP, so client traffic from the
bridge address is never cut (without iptables: blackhole routes to the peer's IP,
which also drop silently). Everything is removed by `teardown()`, which is
also safe to call when nothing (or half) was set up."""

import shutil
import subprocess

SUBNET = "10.213.0"
BRIDGE = "cfbr0"
HOST_IP = f"{SUBNET}.1"


def sh(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


class Net:
    def __init__(self, n=3):
        self.n = n
        self.ns = [f"cf-n{i + 1}" for i in range(n)]
        self.ips = [f"{SUBNET}.{11 + i}" for i in range(n)]
        self.cut = set()  # frozenset({i, j}) pairs currently partitioned
        self.mode = "iptables" if shutil.which("iptables") else "route"

    def setup(self):
        self.teardown()  # leftovers of a killed earlier run
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, (ns, ip) in enumerate(zip(self.ns, self.ips)):
            host_if, node_if = f"cfv{i + 1}", f"cfp{i + 1}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
            sh("ip", "link", "set", node_if, "netns", ns)
            sh("ip", "link", "set", host_if, "master", BRIDGE)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", node_if)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if self.mode != "iptables":
                continue
            # A chain of our own, flushed to heal.
            sh("ip", "netns", "exec", ns, "iptables", "-N", "CFAULT")
            sh("ip", "netns", "exec", ns, "iptables", "-I", "INPUT", "-j", "CFAULT")
            sh("ip", "netns", "exec", ns, "iptables", "-I", "OUTPUT", "-j", "CFAULT")

    def reset(self):
        """Fresh namespaces: a killed cluster's sockets (FIN_WAIT2 on 25672, which
        SO_REUSEADDR does not get past) go with the old ones."""
        self.setup()

    def teardown(self):
        for i, ns in enumerate(self.ns):
            # Whatever still runs in a namespace of ours is ours (RabbitMQ's epmd
            # daemonises out of the node's process group).
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "link", "del", f"cfv{i + 1}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        self.cut.clear()

    def exec_prefix(self, i):
        return ["ip", "netns", "exec", self.ns[i]]

    def partition(self, groups):
        """Cut every link between nodes of different groups, e.g. [[0], [1, 2]]."""
        where = {i: g for g, members in enumerate(groups) for i in members}
        for i in range(self.n):
            for j in range(i + 1, self.n):
                if where.get(i) != where.get(j):
                    self.cut_link(i, j)

    def cut_link(self, i, j):
        for a, b in ((i, j), (j, i)):
            ns = self.ns[a]
            if self.mode == "route":
                sh("ip", "netns", "exec", ns, "ip", "route", "add", "blackhole", f"{self.ips[b]}/32")
                continue
            sh("ip", "netns", "exec", ns, "iptables", "-A", "CFAULT", "-s", self.ips[b], "-j", "DROP")
            sh("ip", "netns", "exec", ns, "iptables", "-A", "CFAULT", "-d", self.ips[b], "-j", "DROP")
        self.cut.add(frozenset((i, j)))

    def heal(self):
        for ns in self.ns:
            for ip in self.ips:
                if self.mode == "route":
                    sh("ip", "netns", "exec", ns, "ip", "route", "del", "blackhole", f"{ip}/32", check=False)
            sh("ip", "netns", "exec", ns, "iptables", "-F", "CFAULT", check=False)
        self.cut.clear()

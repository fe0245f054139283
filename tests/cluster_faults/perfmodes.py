"""Two measurements on the same 3-node clusters in the same namespaces as the fault
matrix, for both brokers (issue 14's performance goals):

    --bench          throughput of one quorum queue through a node that is not its
                     leader (target/release/switchyard-perf), brokers alternated,
                     medians over --bench-rounds
    --idle-queues N  CPU of the whole cluster with N idle quorum queues, as a
                     percentage of one core over --idle-window s

Switchyard runs its release build here (`cargo build --release -p switchyard -p
switchyard-perf`; built when missing). switchyard-perf only talks to loopback
addresses, so it runs inside the chosen node's namespace against 127.0.0.1 (the
node listens on all its addresses there); the forwarding to the leader crosses
the veth/bridge like every peer message."""

import datetime
import json
import os
import statistics
import subprocess
import threading
import time

import pika

import brokers
import workload

# (name, extra switchyard-perf arguments, the rate the table reports)
CASES = [
    ("publish only", ["-x", "1", "-y", "0"], "confirm_rate"),
    ("publish + consume", ["-x", "1", "-y", "1", "-q", "1000", "-n", "100"], "recv_rate"),
]
COMMON = ["-c", "1000", "--persistent", "-s", "16"]


def target_dir(repo):
    return os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(repo, "target"))


def release_binaries(repo, say, sy_binary=None, perf_binary=None):
    """The release switchyard and switchyard-perf; built when missing."""
    rel = os.path.join(target_dir(repo), "release")
    sy = sy_binary or os.path.join(rel, "switchyard")
    perf = perf_binary or os.path.join(rel, "switchyard-perf")
    missing = [p for p in (sy, perf) if not os.access(p, os.X_OK)]
    if missing and (sy_binary is None or perf_binary is None):
        say(f"building {', '.join(os.path.basename(m) for m in missing)}: "
            "cargo build --release -p switchyard -p switchyard-perf")
        r = subprocess.run(["cargo", "build", "--release", "-p", "switchyard", "-p", "switchyard-perf"], cwd=repo,
                           env=dict(os.environ, CARGO_TARGET_DIR=target_dir(repo)))
        if r.returncode != 0:
            raise RuntimeError("cargo build --release failed")
    for p in (sy, perf):
        if not os.access(p, os.X_OK):
            raise RuntimeError(f"missing {p}")
    return sy, perf


def make_cluster(kind, net, workdir, say, args, repo):
    if kind == "switchyard":
        # All listeners on 0.0.0.0 inside the namespace: the harness reaches the
        # node's address, switchyard-perf (loopback only) reaches 127.0.0.1.
        return brokers.Switchyard(net, workdir, say, args.bench_binary, repo, args.sy_cluster, bind_any=True)
    return brokers.RabbitMQ(net, workdir, say)


def connect(cluster, i):
    return pika.BlockingConnection(workload.params(cluster.amqp(i), heartbeat=30))


def declare_quorum(cluster, q, via=0, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            conn = connect(cluster, via)
            conn.channel().queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
            conn.close()
            return
        except Exception as e:
            last = e
            time.sleep(1)
    raise RuntimeError(f"cannot declare {q}: {last}")


def delete_queue(cluster, q):
    for i in range(3):
        try:
            conn = connect(cluster, i)
            conn.channel().queue_delete(q)
            conn.close()
            return
        except Exception:
            continue


def wait_leader(cluster, q, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ld = cluster.queue_leader(q)
        if ld is not None:
            return ld
        time.sleep(0.5)
    raise RuntimeError(f"{cluster.name}: no leader for {q}")


def run_perf(cluster, net, perf, node, q, extra, duration, log):
    cmd = net.exec_prefix(node) + [perf, "--host", "127.0.0.1", "--port", "5672", "--queue", q,
                                    "--queue-type", "quorum", *COMMON, *extra, "-z", str(int(duration)),
                                    "--json", "--quiet", "--label", f"{cluster.name}-{q}"]
    log(" ".join(cmd[4:]) + f"   (in {net.ns[node]})")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 300)
    if r.returncode != 0:
        raise RuntimeError(f"switchyard-perf failed ({r.returncode}): {r.stderr[-500:]}")
    return json.loads(r.stdout)


def bench(args, net, outdir, say, repo):
    args.bench_binary, perf = release_binaries(repo, say, args.bench_binary, args.perf_binary)
    say(f"bench: switchyard {args.bench_binary}, {perf}")
    rows = []  # dicts: round, broker, case, rates, leader, via
    order = {"both": ["rabbitmq", "switchyard"], "rabbitmq": ["rabbitmq"], "switchyard": ["switchyard"]}[args.target]
    for rnd in range(args.bench_rounds):
        kinds = order if rnd % 2 == 0 else list(reversed(order))
        for kind in kinds:
            net.reset()
            cluster = make_cluster(kind, net, os.path.join(outdir, f"bench-r{rnd + 1}-{kind}"), say, args, repo)
            try:
                t = time.monotonic()
                cluster.start()
                say(f"bench round {rnd + 1}: {kind} cluster up in {time.monotonic() - t:.1f} s")
                for ci, (case, extra, _) in enumerate(CASES):
                    q = f"bench-{rnd + 1}-{ci}"
                    declare_quorum(cluster, q, via=0)
                    leader = wait_leader(cluster, q)
                    via = next(i for i in range(3) if i != leader)
                    load = os.getloadavg()[0]
                    rep = run_perf(cluster, net, perf, via, q, extra, args.bench_duration, say)
                    row = {"round": rnd + 1, "broker": kind, "case": case,
                           "leader": cluster.nodes[leader].name, "via": cluster.nodes[via].name,
                           "confirm_rate": rep.get("confirm_rate"), "recv_rate": rep.get("recv_rate"),
                           "send_rate": rep.get("send_rate"), "nacked": rep.get("nacked"),
                           "errors": rep.get("errors"), "p50_ms": (rep.get("latency") or {}).get("p50_us"),
                           "other_cpu_secs": rep.get("other_cpu_secs"), "load1_before": round(load, 1)}
                    rows.append(row)
                    say(f"bench round {rnd + 1} {kind} {case}: confirmed {row['confirm_rate']:.0f} msg/s, "
                        f"received {row['recv_rate']:.0f} msg/s (leader {row['leader']}, via {row['via']})")
                    delete_queue(cluster, q)
            finally:
                cluster.stop()
    return rows


def med(rows, broker, case, key):
    xs = [r[key] for r in rows if r["broker"] == broker and r["case"] == case and r.get(key) is not None]
    return statistics.median(xs) if xs else None


def bench_table(rows, rounds, duration):
    brokers_seen = [b for b in ("switchyard", "rabbitmq") if any(r["broker"] == b for r in rows)]
    out = [f"One quorum queue, 3 nodes, client on a node that is not the leader; switchyard-perf "
           f"`{' '.join(COMMON)} -z {int(duration)}`; medians of {rounds} round(s), brokers alternated.", ""]
    head = "| case | " + " | ".join(f"{b} msg/s" for b in brokers_seen)
    if len(brokers_seen) == 2:
        head += " | switchyard / rabbitmq"
    out.append(head + " |")
    out.append("|" + "---|" * (len(brokers_seen) + 1 + (len(brokers_seen) == 2)))
    for case, extra, _ in CASES:
        keys = [("confirm_rate", "confirmed")] + ([("recv_rate", "received")] if "-y" in extra and
                                                   extra[extra.index("-y") + 1] != "0" else [])
        for key, what in keys:
            vals = [med(rows, b, case, key) for b in brokers_seen]
            cells = [f"{v:,.0f}" if v is not None else "-" for v in vals]
            line = f"| {case}, {what} (`{' '.join(extra)}`) | " + " | ".join(cells)
            if len(brokers_seen) == 2:
                a, b = vals
                line += " | " + (f"{a / b:.2f}x" if a and b else "-")
            out.append(line + " |")
    out.append("")
    out.append("Per round (confirmed / received msg/s):")
    out.append("")
    for r in rows:
        out.append(f"- round {r['round']} {r['broker']:10} {r['case']:18} {r['confirm_rate']:>9,.0f} / "
                   f"{r['recv_rate']:>9,.0f}  leader {r['leader']}, via {r['via']}, load {r['load1_before']}"
                   + (f", errors {r['errors']}" if r.get("errors") else ""))
    return "\n".join(out)


# ------------------------------------------------------------------ idle CPU

def cluster_pids(cluster, net, kind):
    """The broker processes of every node: Switchyard's processes, RabbitMQ's beam.smp
    (all found by namespace, so a restarted or forked process is counted too)."""
    pids = []
    for ns in net.ns:
        for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                comm = open(f"/proc/{p}/comm").read().strip()
            except OSError:
                continue
            if (kind == "rabbitmq" and comm.startswith("beam")) or (kind == "switchyard" and comm == "switchyard"):
                pids.append(int(p))
    return pids


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def measure(pids, window):
    """CPU of `pids` over `window` s: (% of one core, CPU-s, % per process)."""
    tck = os.sysconf("SC_CLK_TCK")
    before = {p: cpu_ticks(p) for p in pids}
    t0 = time.monotonic()
    time.sleep(window)
    after = {p: cpu_ticks(p) for p in pids}
    secs = time.monotonic() - t0
    used = sum(after[p] - before[p] for p in pids) / tck
    return round(100 * used / secs, 1), used, [round(100 * (after[p] - before[p]) / tck / secs, 1) for p in pids]


def list_queues(cluster, i):
    data = brokers.http_get(*cluster.http(i), "/api/queues/%2F?columns=name,leader,type", timeout=30)
    if isinstance(data, dict):
        data = data.get("items", [])
    return data


def declare_many(cluster, names, say):
    """queue.declare of every name, spread over the three nodes (name i through node i % 3)."""
    errors = []

    def worker(node):
        mine = names[node::3]
        conn = None
        for attempt in range(3):
            try:
                conn = connect(cluster, node)
                ch = conn.channel()
                while mine:
                    ch.queue_declare(mine[0], durable=True, arguments={"x-queue-type": "quorum"})
                    mine = mine[1:]
                conn.close()
                return
            except Exception as e:
                errors.append(f"node {node}: {type(e).__name__} {e}")
                time.sleep(2)
        errors.append(f"node {node}: gave up with {len(mine)} left")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def idle(args, net, outdir, say, repo):
    args.bench_binary, _ = release_binaries(repo, say, args.bench_binary, args.perf_binary)
    kinds = {"both": ["rabbitmq", "switchyard"], "rabbitmq": ["rabbitmq"], "switchyard": ["switchyard"]}[args.target]
    results = []
    for kind in kinds:
        net.reset()
        cluster = make_cluster(kind, net, os.path.join(outdir, f"idle-{kind}"), say, args, repo)
        res = {"broker": kind, "queues": args.idle_queues, "window_s": args.idle_window}
        try:
            t = time.monotonic()
            cluster.start()
            say(f"idle: {kind} cluster up in {time.monotonic() - t:.1f} s")
            if args.idle_baseline > 0:
                # The same cluster without queues: what the queues add is the difference.
                time.sleep(args.idle_settle)
                pct, _, _ = measure(cluster_pids(cluster, net, kind), args.idle_baseline)
                res["baseline_pct"] = pct
                say(f"idle: {kind}: no queues: {pct}% of one core over {args.idle_baseline:.0f} s")
            names = [f"idle-{i:05d}" for i in range(args.idle_queues)]
            t = time.monotonic()
            errs = declare_many(cluster, names, say)
            res["declare_s"] = round(time.monotonic() - t, 1)
            say(f"idle: {kind}: declared {len(names)} quorum queues in {res['declare_s']} s"
                + (f" ({len(errs)} errors: {errs[:3]})" if errs else ""))
            # Every queue has a leader, as every node sees it.
            t = time.monotonic()
            deadline = t + args.idle_leader_timeout
            want = set(names)
            while True:
                missing = None
                try:
                    missing = set()
                    for i in range(3):
                        led = {q["name"] for q in list_queues(cluster, i) if q.get("leader")}
                        missing |= want - led
                except Exception as e:
                    missing = missing or {f"(http: {e})"}
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(missing)} queues without a leader after {args.idle_leader_timeout} s,"
                                       f" e.g. {sorted(missing)[:3]}")
                time.sleep(2)
            res["leaders_after_s"] = round(time.monotonic() - t, 1)
            leaders = {}
            for q in list_queues(cluster, 0):
                if q["name"] in want:
                    leaders[q["leader"]] = leaders.get(q["leader"], 0) + 1
            res["leaders_per_node"] = leaders
            say(f"idle: {kind}: every queue has a leader ({leaders}); settling {args.idle_settle} s")
            time.sleep(args.idle_settle)
            res["load1_before"] = round(os.getloadavg()[0], 1)
            pids = cluster_pids(cluster, net, kind)
            pct, used, per = measure(pids, args.idle_window)
            res.update(pids=len(pids), cpu_s=round(used, 2), cpu_pct_one_core=pct, per_node=per)
            say(f"idle: {kind}: {args.idle_queues} idle quorum queues: {used:.2f} CPU-s in {args.idle_window:.0f} s = "
                f"{res['cpu_pct_one_core']}% of one core ({len(pids)} processes: {res['per_node']})")
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            say(f"idle: {kind}: {res['error']}")
        finally:
            cluster.stop()
        results.append(res)
    return results


def idle_table(results):
    out = ["| broker | quorum queues | CPU over the window, % of one core | per process | no queues (baseline) "
           "| declare | all leaders | load avg before |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            out.append(f"| {r['broker']} | {r['queues']} | error: {r['error']} | | | | | |")
            continue
        out.append(f"| {r['broker']} | {r['queues']} | {r['cpu_pct_one_core']}% ({r['cpu_s']} CPU-s in "
                   f"{r['window_s']:.0f} s) | {r['per_node']} | "
                   + (f"{r['baseline_pct']}%" if "baseline_pct" in r else "-")
                   + f" | {r['declare_s']} s | {r['leaders_after_s']} s | {r.get('load1_before', '-')} |")
    return "\n".join(out)


def stamp():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

"""Cluster fault matrix: one quorum queue on a 3-node cluster (Switchyard or
RabbitMQ), publishers with confirms and acking consumers, one fault per run,
then heal, drain and check (checker.py). See README.md in this directory."""

import argparse
import atexit
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pika  # noqa: E402

import brokers  # noqa: E402
import checker  # noqa: E402
import net as netmod  # noqa: E402
import perfmodes  # noqa: E402
import workload  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))

FAULTS = ["kill-leader", "kill-follower", "kill-all", "pause-leader",
          "partition-leader", "partition-follower", "partition-bridge"]
SHORT = ["kill-leader", "pause-leader", "partition-leader"]

T0 = time.monotonic()


def say(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def declare(cluster, q, timeout=60, control=False):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        for i in ([0] if control else range(3)):
            try:
                conn = pika.BlockingConnection(workload.params(cluster.amqp(i)))
                ch = conn.channel()
                if control:  # the negative control: a transient classic queue on node 1 only
                    ch.queue_declare(q, durable=False)
                else:
                    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
                ch.queue_bind(q, "amq.topic", routing_key="cf." + q)
                conn.close()
                return i
            except Exception as e:
                last = e
        time.sleep(1)
    raise RuntimeError(f"cannot declare {q}: {last}")


def others_of(leader):
    return [i for i in range(3) if i != leader]


def inject(kind, cluster, net, leader):
    """Applies the fault; returns (victim description, heal function)."""
    others = others_of(leader)
    f1, f2 = others
    name = lambda i: cluster.nodes[i].name  # noqa: E731
    if kind == "kill-leader":
        cluster.kill9(leader)
        return name(leader), lambda: cluster.start_nodes([leader])
    if kind == "kill-follower":
        cluster.kill9(f1)
        return name(f1), lambda: cluster.start_nodes([f1])
    if kind == "kill-all":
        for i in range(3):
            cluster.kill9(i)
        return "all", lambda: cluster.start_nodes([0, 1, 2])
    if kind == "pause-leader":
        cluster.pause(leader)
        return name(leader), lambda: cluster.resume(leader)
    if kind == "partition-leader":
        net.partition([[leader], others])
        return f"{name(leader)} | rest", net.heal
    if kind == "partition-follower":
        net.partition([[f1], [leader, f2]])
        return f"{name(f1)} | rest", net.heal
    if kind == "partition-bridge":
        net.cut_link(leader, f2)
        return f"{name(leader)} x {name(f2)} (bridge {name(f1)})", net.heal
    raise ValueError(kind)


LAPIN_EXAMPLE = "fault_publisher_lapin"


def lapin_publisher(given, sy_binary):
    """The lapin publisher example: `given`, else next to the Switchyard binary (a
    `cargo build --all-targets` puts it in <target>/debug/examples), else in
    $CARGO_TARGET_DIR / <repo>/target. Built (cargo build --example) when missing or
    older than its source."""
    if given:
        if not os.access(given, os.X_OK):
            raise RuntimeError(f"no lapin publisher {given}")
        return given
    src = os.path.join(REPO, "examples", LAPIN_EXAMPLE + ".rs")
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    candidates = [os.path.join(os.path.dirname(os.path.abspath(sy_binary)), "examples", LAPIN_EXAMPLE),
                  os.path.join(os.path.abspath(target), "debug", "examples", LAPIN_EXAMPLE)]
    for c in candidates:
        if os.access(c, os.X_OK) and os.path.getmtime(c) >= os.path.getmtime(src):
            return c
    say(f"building the lapin publisher: cargo build --example {LAPIN_EXAMPLE} (target {target})")
    r = subprocess.run(["cargo", "build", "-p", "switchyard", "--example", LAPIN_EXAMPLE], cwd=REPO,
                       env=dict(os.environ, CARGO_TARGET_DIR=target))
    built = os.path.join(os.path.abspath(target), "debug", "examples", LAPIN_EXAMPLE)
    if r.returncode != 0 or not os.access(built, os.X_OK):
        raise RuntimeError(f"cargo build --example {LAPIN_EXAMPLE} failed")
    return built


def one_run(args, n, kind, target, net, outdir):
    run_dir = os.path.join(outdir, f"run{n:02d}-{target}-{kind}")
    if target == "switchyard":
        cluster = brokers.Switchyard(net, run_dir, say, args.binary, REPO, args.sy_cluster)
    else:
        cluster = brokers.RabbitMQ(net, run_dir, say, mqtt=args.mqtt)
    q = f"cf-{n}-{kind}"
    pubs, cons, deliveries = [], [], []
    res = {"run": n, "target": target, "fault": kind, "victim": "", "error": None}
    try:
        t = time.monotonic()
        cluster.start()
        say(f"run {n}: {target} cluster up in {time.monotonic() - t:.1f} s; fault {kind}")
        declare(cluster, q, control=args.control)
        addrs = [cluster.amqp(i) for i in range(3)]
        for c in range(args.consumers):
            cons.append(workload.Consumer(c, addrs, q, deliveries, start_node=c + 1))
        for p in range(args.publishers):
            pubs.append(workload.Publisher(p, addrs, q, args.rate, window=args.window,
                                           confirm_timeout=args.confirm_timeout, start_node=p))
        if args.mqtt:
            pubs.append(workload.MqttPublisher(100, addrs, "cf/" + q, args.rate, start_node=2))
        if args.lapin:
            pubs.append(workload.LapinPublisher(200, addrs, q, args.rate, args.lapin_binary, window=args.window,
                                                confirm_timeout=args.confirm_timeout, start_node=1))
        for th in cons + pubs:
            th.start()
        t_start = time.monotonic()
        time.sleep(args.warmup)
        leader = 0 if args.control else cluster.queue_leader(q)
        res["leader"] = cluster.nodes[leader].name if leader is not None else "?"
        if leader is None:
            leader = 0
        t_fault = time.monotonic()
        victim, heal = inject(kind, cluster, net, leader)
        res["victim"] = victim
        say(f"run {n}: injected {kind} on {victim} (queue leader {res['leader']})")
        hold = args.pause_hold if kind == "pause-leader" else (2 if kind == "kill-all" else args.hold)
        # Who leads the queue while the fault lasts (as the reachable nodes say).
        seen = []
        while time.monotonic() < t_fault + hold - 1:
            time.sleep(min(args.leader_poll, max(0, t_fault + hold - 1 - time.monotonic())))
            ld = cluster.queue_leader(q, avoid=(leader,))
            name = cluster.nodes[ld].name if ld is not None else "?"
            if not seen or seen[-1][1] != name:
                seen.append((round(time.monotonic() - t_fault, 1), name))
        res["leaders_during_fault"] = seen
        time.sleep(max(0, t_fault + hold - time.monotonic()))
        heal()
        t_heal = time.monotonic()
        say(f"run {n}: healed after {t_heal - t_fault:.1f} s")
        time.sleep(max(0, t_start + args.duration - time.monotonic()))
        # The load ends here: the time publishers take to stop (a paho loop,
        # the lapin child reading its closed stdin) is no stretch without
        # confirms (it showed as a 1.0 s "failover" at the end of every run).
        t_end = time.monotonic()
        for th in pubs:
            th.stop()
        for th in pubs:
            th.join(10)
        for th in cons:
            th.stop()
        for th in cons:
            th.join(10)
        producers = {p.pid: (p.attempted, p.confirmed) for p in pubs}
        pre = checker.check(producers, [], t_fault, t_end)
        res["failover"] = pre["failover"]  # kept even if the heal or the drain fails
        res["failover_at"] = pre["failover_at"]
        res["pub_events"] = [f"{e[0] - t_fault:+.1f} {e[1]}" for p in pubs for e in getattr(p, "events", [])][-40:]
        # Heal everything, then drain through any node.
        net.heal()
        suspects = {"kill-leader": [leader], "pause-leader": [leader], "partition-leader": [leader],
                    "partition-follower": [others_of(leader)[0]], "partition-bridge": [leader]}.get(kind, [])
        cluster.ensure_up(suspects=suspects)
        ok, left, notes = workload.drain(addrs, q, deliveries, timeout=args.drain_timeout)
        r = checker.check(producers, deliveries, t_fault, t_end)
        if r["lost"] and not args.no_redrain:
            # Messages checked out to a consumer that vanished come back late
            # (RabbitMQ: consumer_disconnected_timeout, 60 s): drain again before calling them lost.
            say(f"run {n}: {r['lost']} missing after the drain; draining again for up to {args.redrain} s")
            end = time.monotonic() + args.redrain
            while r["lost"] and time.monotonic() < end:
                time.sleep(5)
                ok, left, more = workload.drain(addrs, q, deliveries, timeout=20)
                notes += more
                r = checker.check(producers, deliveries, t_fault, t_end)
        res.update(r)
        res["drained"] = ok
        res["left"] = left
        res["notes"] = notes[-5:]
        res["heal_after"] = round(t_heal - t_fault, 1)
        res["pub_events"] = [f"{e[0] - t_fault:+.1f} {e[1]}" for p in pubs for e in getattr(p, "events", [])][-40:]
        res["nacks"] = sum(getattr(p, "nacks", 0) for p in pubs)
        res["per_producer"] = {p.pid: [len(p.attempted), len(p.confirmed)] for p in pubs}
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        for th in pubs + cons:
            th.stop()
        cluster.stop()
        net.heal()
    res["clean"] = res["error"] is None and res.get("lost") == 0 and res.get("unexpected") == 0
    if res["clean"] and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        res["logs"] = run_dir
    return res


COLS = [("run", 3), ("target", 10), ("fault", 18), ("victim", 24), ("attempted", 9), ("confirmed", 9),
        ("received", 8), ("lost", 5), ("unexpected", 10), ("duplicates", 10), ("recovered", 9),
        ("order", 5), ("failover", 8), ("at", 6), ("verdict", 7)]


def row(r):
    cells = []
    for k, w in COLS:
        if k == "verdict":
            v = "ok" if r["clean"] else ("ERROR" if r["error"] else "LOSS")
        elif k == "failover":
            v = f"{r['failover']:.1f}s" if r.get("failover") is not None else "-"
        elif k == "at":
            # When the longest stretch began, from the fault (+20 is a heal).
            v = f"+{r['failover_at']:.1f}" if r.get("failover_at") is not None else "-"
        else:
            v = r.get(k, "-")
        cells.append(str(v)[:w].ljust(w))
    return " ".join(cells)


def header():
    return " ".join(k[:w].ljust(w) for k, w in COLS)


def summary(results):
    lines = ["", "summary (per target and fault: runs, lost, unexpected, duplicates, failover min/median/max):"]
    groups = {}
    for r in results:
        groups.setdefault((r["target"], r["fault"]), []).append(r)
    for (target, fault), rs in sorted(groups.items()):
        fo = sorted(r["failover"] for r in rs if r.get("failover") is not None)
        med = fo[len(fo) // 2] if fo else None
        fmt = lambda x: "-" if x is None else f"{x:.1f}s"  # noqa: E731
        errs = sum(1 for r in rs if r["error"])
        lines.append(f"  {target:10} {fault:18} runs={len(rs)} lost={sum(r.get('lost', 0) for r in rs)} "
                     f"unexpected={sum(r.get('unexpected', 0) for r in rs)} "
                     f"dup={sum(r.get('duplicates', 0) for r in rs)} failover={fmt(fo[0] if fo else None)}/"
                     f"{fmt(med)}/{fmt(fo[-1] if fo else None)}" + (f" errors={errs}" if errs else ""))
    bad = [r for r in results if not r["clean"]]
    lines.append(f"{len(results)} runs, {len(bad)} not clean" +
                 (": " + ", ".join(f"run {r['run']} ({r['target']} {r['fault']})" for r in bad) if bad else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["switchyard", "rabbitmq", "both"], default=None,
                    help="default: switchyard for the fault matrix, both for --bench and --idle-queues")
    ap.add_argument("--short", action="store_true",
                    help="a few ~25 s Switchyard runs (for scripts/test): " + ", ".join(SHORT))
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, from: " + ", ".join(FAULTS))
    ap.add_argument("--repeat", type=int, default=4, help="runs per fault (full matrix: 7 faults x 4 = 28)")
    ap.add_argument("--duration", type=float, default=90, help="seconds of load per run")
    ap.add_argument("--warmup", type=float, default=15, help="seconds of load before the fault")
    ap.add_argument("--hold", type=float, default=20, help="how long a partition / killed node lasts")
    ap.add_argument("--pause-hold", type=float, default=20, help="how long SIGSTOP lasts")
    ap.add_argument("--publishers", type=int, default=3)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=30, help="messages/s per publisher")
    ap.add_argument("--window", type=int, default=10, help="unconfirmed messages per publisher")
    ap.add_argument("--confirm-timeout", type=float, default=5, help="s without a confirm before moving node")
    ap.add_argument("--mqtt", action=argparse.BooleanOptionalAction, default=None,
                    help="add a paho-mqtt QoS 1 publisher (default: on, also in --short)")
    ap.add_argument("--lapin", action=argparse.BooleanOptionalAction, default=None,
                    help="add a Rust lapin 4 publisher with confirms, examples/fault_publisher_lapin.rs "
                         "(default: on, also in --short; built with cargo when missing)")
    ap.add_argument("--lapin-binary", default=os.environ.get("LAPIN_PUBLISHER_BIN"),
                    help="the built example (default: examples/ next to --binary, else "
                         "$CARGO_TARGET_DIR or <repo>/target /debug/examples/fault_publisher_lapin)")
    ap.add_argument("--leader-poll", type=float, default=4, help="s between leader look-ups during a fault")
    ap.add_argument("--drain-timeout", type=float, default=60)
    ap.add_argument("--redrain", type=float, default=75, help="s of further draining when messages are missing")
    ap.add_argument("--no-redrain", action="store_true")
    ap.add_argument("--binary", default=os.environ.get("SWITCHYARD_BIN", os.path.join(REPO, "target/debug/switchyard")))
    ap.add_argument("--control", action="store_true",
                    help="negative control: a transient classic queue on node 1, the 'leader' is node 1; "
                         "kill-leader must then show lost > 0 (the checker can fail)")
    ap.add_argument("--sy-cluster", default="", help='extra [cluster] keys for Switchyard, ";"-separated, e.g. "write_timeout_ms = 3000"')
    ap.add_argument("--bench", action="store_true",
                    help="instead of the matrix: throughput of one quorum queue through a non-leader node, "
                         "switchyard-perf, both brokers alternated (release builds)")
    ap.add_argument("--bench-rounds", type=int, default=3)
    ap.add_argument("--bench-duration", type=float, default=10, help="s per switchyard-perf run")
    ap.add_argument("--bench-binary", default=None,
                    help="Switchyard for --bench/--idle-queues (default: <target>/release/switchyard, built if missing)")
    ap.add_argument("--perf-binary", default=None, help="default: <target>/release/switchyard-perf")
    ap.add_argument("--idle-queues", type=int, default=0, metavar="N",
                    help="instead of the matrix: CPU of each 3-node cluster with N idle quorum queues")
    ap.add_argument("--idle-window", type=float, default=30, help="s of idle CPU measured")
    ap.add_argument("--idle-settle", type=float, default=10, help="s to wait after every queue has a leader")
    ap.add_argument("--idle-leader-timeout", type=float, default=900)
    ap.add_argument("--idle-baseline", type=float, default=15,
                    help="s of CPU measured on the cluster before any queue (0: skip)")
    ap.add_argument("--out", default=None, help="results and logs of runs that were not clean")
    ap.add_argument("--keep", action="store_true", help="keep every run's logs and data")
    args = ap.parse_args()
    if args.short:
        args.target, args.faults, args.repeat = "switchyard", ",".join(SHORT), 1
        args.duration, args.warmup, args.hold, args.pause_hold = 25, 6, 8, 8
    perf_mode = args.bench or args.idle_queues > 0
    if args.target is None:
        args.target = "both" if perf_mode else "switchyard"
    if args.mqtt is None:
        args.mqtt = not args.control
    if args.lapin is None:
        args.lapin = not args.control
    if os.geteuid() != 0:
        print("cluster_faults: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.lapin and not perf_mode:
        try:
            args.lapin_binary = lapin_publisher(args.lapin_binary, args.binary)
        except RuntimeError as e:
            print(f"cluster_faults: {e}", file=sys.stderr)
            return 2
    targets = ["rabbitmq", "switchyard"] if args.target == "both" else [args.target]
    if "switchyard" in targets and not perf_mode and not os.access(args.binary, os.X_OK):
        print(f"cluster_faults: no binary {args.binary} (cargo build -p switchyard)", file=sys.stderr)
        return 2
    if "rabbitmq" in targets and not os.access(os.path.join(brokers.RABBIT_BIN, "rabbitmq-server"), os.X_OK):
        print("cluster_faults: RabbitMQ is not installed (apt-get install rabbitmq-server)", file=sys.stderr)
        return 2
    faults = [f for f in args.faults.split(",") if f]
    for f in faults:
        if f not in FAULTS:
            ap.error(f"unknown fault {f}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.out or f"/tmp/cluster-faults-{stamp}"
    os.makedirs(outdir, exist_ok=True)

    net = netmod.Net(3)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Started in the background by a shell, SIGINT arrives ignored: take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(net.teardown)
    if perf_mode:
        return perf_main(args, net, outdir)
    results = []
    try:
        net.setup()
        say(f"namespaces {net.ns} on {net.ips}, partitions by {net.mode}; results in {outdir}")
        n = 0
        for ti, target in enumerate(targets):
            if ti > 0:
                net.reset()  # RabbitMQ's dead sockets on 25672 would keep Switchyard's peer port
            for rep in range(args.repeat):
                for kind in faults:
                    n += 1
                    r = one_run(args, n, kind, target, net, outdir)
                    results.append(r)
                    with open(os.path.join(outdir, "results.jsonl"), "a") as f:
                        f.write(json.dumps(r, default=str) + "\n")
                    print(header())
                    print(row(r), flush=True)
                    if not r["clean"]:
                        for k in ("error", "lost_sample", "lost_middle", "unexpected_sample", "notes", "logs"):
                            if r.get(k):
                                print(f"    {k}: {r[k]}")
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
    finally:
        net.teardown()
    print()
    print(header())
    for r in results:
        print(row(r))
    print(summary(results))
    with open(os.path.join(outdir, "summary.txt"), "w") as f:
        f.write(header() + "\n" + "\n".join(row(r) for r in results) + "\n" + summary(results) + "\n")
    if any(r.get("lost") or r.get("unexpected") for r in results):
        return 1
    if any(r["error"] for r in results) or not results:
        return 2
    return 0


def perf_main(args, net, outdir):
    """--bench and --idle-queues: same namespaces, no faults."""
    status = 0
    try:
        net.setup()
        say(f"namespaces {net.ns} on {net.ips}; results in {outdir}")
        if args.bench:
            rows = perfmodes.bench(args, net, outdir, say, REPO)
            table = perfmodes.bench_table(rows, args.bench_rounds, args.bench_duration)
            cmd = "tests/cluster_faults/run " + " ".join(sys.argv[1:])
            text = f"# Quorum queue throughput, {perfmodes.stamp()}\n\n`{cmd}`\n\n{table}\n"
            print("\n" + text, flush=True)
            open(os.path.join(outdir, "bench.md"), "w").write(text)
            with open(os.path.join(outdir, "bench.jsonl"), "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        if args.idle_queues > 0:
            res = perfmodes.idle(args, net, outdir, say, REPO)
            table = perfmodes.idle_table(res)
            cmd = "tests/cluster_faults/run " + " ".join(sys.argv[1:])
            text = (f"# Idle quorum queues, {perfmodes.stamp()}\n\n`{cmd}`\n\n"
                    f"utime+stime of the broker processes (Switchyard: switchyard; RabbitMQ: beam.smp) of all "
                    f"3 nodes over {args.idle_window:.0f} s, after every queue had a leader and "
                    f"{args.idle_settle:.0f} s more.\n\n{table}\n")
            print("\n" + text, flush=True)
            open(os.path.join(outdir, "idle.md"), "w").write(text)
            with open(os.path.join(outdir, "idle.jsonl"), "a") as f:
                for r in res:
                    f.write(json.dumps(r) + "\n")
            if any(r.get("error") for r in res):
                status = 2
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        status = 2
    except Exception:
        traceback.print_exc()
        status = 2
    finally:
        net.teardown()
    return status


if __name__ == "__main__":
    sys.exit(main())

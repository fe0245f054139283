#!/usr/bin/env python3
"""Turns the JSON lines of bench/compare.sh into BENCHMARKS.md: medians per case
and broker over the rounds, ratios against the reference, and the issue's goals."""

import argparse
import json
import platform
import statistics
import subprocess
from collections import defaultdict

# Issue 11: peak resident set and p99 latency at unlimited rate.
# case -> (peak RSS goal in MB, p99 goal in ms or None)
UNLIMITED_GOALS = {
    "S1": (300, 50),
    "S5-qos0-1x1": (300, 50),
    "S5-qos1-1x1": (300, 50),
    "S5-qos0-100x100": (500, None),
}

# case prefix -> (metric key, label, higher is better, goal text, goal check(sy, ref, ratio))
GOALS = {
    "S1": ("recv_rate", "msg/s", True, ">= 3x RabbitMQ", lambda s, r, q: q >= 3),
    "S2": ("recv_rate", "msg/s", True, ">= 1.5x RabbitMQ", lambda s, r, q: q >= 1.5),
    "S3": ("recv_rate", "deliveries/s", True, "", None),
    "S4-amqp-10k": ("p99_us", "p99 us", False, "p99 <= 500 us", lambda s, r, q: s <= 500),
    "S4-mqtt-10k": ("p99_us", "p99 us", False, "p99 <= 500 us", lambda s, r, q: s <= 500),
    "S4": ("p99_us", "p99 us", False, "", None),
    "S5": ("recv_rate", "msg/s", True, ">= Mosquitto (and per CPU s)", "cpu"),
    "S6": ("recv_rate", "deliveries/s", True, ">= Mosquitto (and per CPU s)", "cpu"),
    # Issue 11's goals (issue 6 asked for 10 and 30 kB).
    "S7-mqtt": ("idle_bytes_per_conn", "bytes/conn", False, "<= 2 kB", lambda s, r, q: s <= 2_000),
    "S7-amqp": ("idle_bytes_per_conn", "bytes/conn", False, "<= 6 kB", lambda s, r, q: s <= 6_000),
    "S7-stomp": ("idle_bytes_per_conn", "bytes/conn", False, "<= 4 kB", lambda s, r, q: s <= 4_000),
    "S7": ("idle_bytes_per_conn", "bytes/conn", False, "", None),
    "S8": ("recv_rate", "msg/s", True, ">= 2x RabbitMQ STOMP", lambda s, r, q: q >= 2),
    "S9": ("recv_rate", "msg/s", True, "", None),
    "S10": ("recv_mb_per_sec", "MB/s", True, ">= 500 MB/s", lambda s, r, q: s >= 500),
    "S11": ("recv_rate", "msg/s", True, "", None),
    # Issue 13: streams (Switchyard fsyncs before it confirms; RabbitMQ streams do not).
    "ST-protocol": ("recv_rate", "msg/s", True, ">= 2x RabbitMQ", lambda s, r, q: q >= 2),
    "ST-amqp": ("recv_rate", "msg/s", True, ">= 2x RabbitMQ", lambda s, r, q: q >= 2),
    "ST-fill": ("confirm_rate", "confirmed msg/s", True, "", None),
    "ST-replay-1": ("recv_busy_rate", "msg/s while reading", True, ">= 1 M msg/s",
                    lambda s, r, q: s >= 1_000_000),
    "ST-replay": ("recv_busy_rate", "deliveries/s while reading", True, "", None),
    # Issue 11: peak RSS over the broker's start while flooding under a 128 MiB watermark.
    "FLOOD": ("flood_mb", "peak RSS over start, MB", False, "<= 1.25 x 128 MiB",
              lambda s, r, q: s <= 1.25 * 134.217728),
    # Issue 11: resident bytes per queued 16-byte transient message (1 M queued).
    "BACKLOG": ("backlog_bytes_per_msg", "bytes/queued msg", False, "<= 150 bytes",
                lambda s, r, q: s <= 150),
}


def goal_for(case):
    best = None
    for prefix in GOALS:
        if case == prefix or case.startswith(prefix + "-"):
            if best is None or len(prefix) > len(best):
                best = prefix
    return GOALS[best] if best else ("recv_rate", "msg/s", True, "", None)


def metric(r, key):
    if key in ("p50_us", "p99_us", "p999_us", "max_us"):
        return r["latency"][key]
    if key == "idle_bytes_per_conn":
        return (r.get("broker") or {}).get(key)
    if key == "flood_mb":
        b = r.get("broker") or {}
        if b.get("hwm_kb") is None or b.get("rss_kb_start") is None:
            return None
        return (b["hwm_kb"] - b["rss_kb_start"]) * 1024 / 1e6
    if key == "backlog_bytes_per_msg":
        b = r.get("broker") or {}
        if not r.get("confirmed") or b.get("rss_kb_end") is None:
            return None
        return (b["rss_kb_end"] - b["rss_kb_start"]) * 1024 / r["confirmed"]
    if key in ("disk_read_bytes", "read_syscall_bytes"):
        v = (r.get("broker") or {}).get(key)
        return None if v is None else v / 1e6
    if key in ("cpu_secs", "msgs_per_cpu_sec", "hwm_kb"):
        return (r.get("broker") or {}).get(key)
    return r.get(key)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, key=""):
    if v is None:
        return "-"
    if key.endswith("_us") or key in ("idle_bytes_per_conn", "backlog_bytes_per_msg"):
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.2f}"


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--rounds")
    ap.add_argument("--duration")
    ap.add_argument("--started")
    ap.add_argument("--load-before")
    ap.add_argument("--load-after")
    ap.add_argument("--command")
    ap.add_argument("--cases", help="the case list compare.sh ran (id|reference|protocol|args)")
    ap.add_argument("--notes", help="hand-written analysis appended at the end")
    a = ap.parse_args()

    runs = defaultdict(list)  # (case, broker) -> [report]
    failures = defaultdict(int)
    order = []
    loads = []
    others = []
    for line in open(a.results):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        case, broker, _round, load = (r["label"].split("|") + ["", "", "", ""])[:4]
        if case not in order:
            order.append(case)
        if r.get("failed"):
            failures[(case, broker)] += 1
            continue
        if r.get("errors"):
            failures[(case, broker)] += 1
        loads.append(float(load or 0))
        if r.get("other_cpu_secs") is not None:
            others.append(r["other_cpu_secs"])
        runs[(case, broker)].append(r)

    def reference(case):
        brokers = {b for (c, b) in list(runs) + list(failures) if c == case and b != "switchyard"}
        return sorted(brokers)[0] if brokers else "-"

    lines = []
    w = lines.append
    w("# Benchmarks")
    w("")
    w("Switchyard against the broker a user would otherwise pick, on the same machine in")
    w("the same run: RabbitMQ for AMQP 0-9-1 and STOMP, Mosquitto for MQTT. Produced by")
    w("`bench/compare.sh` (scenarios S1-S11 of issue 6); every figure is the median over")
    w("the rounds, the brokers taking turns going first. Load is generated by")
    w("`switchyard-perf` (crates/perf) on the same 2 cores, so client and broker compete")
    w("for CPU; the client's own CPU time is in the raw results.")
    w("")
    w("## Machine and command")
    w("")
    w(f"- Command: `{a.command}` (started {a.started})")
    cpu = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
    mem = sh("free -g | awk '/Mem:/{print $2}'")
    ver = lambda pkg: sh("dpkg-query -W -f='${Version}' " + pkg)  # noqa: E731
    commit = sh("git rev-parse --short HEAD")
    w(f"- CPU: {cpu}, {sh('nproc')} cores; memory {mem} GiB; kernel {platform.release()}")
    w(f"- Switchyard {commit} (release build), RabbitMQ {ver('rabbitmq-server')} "
      f"(Erlang {ver('erlang-base')}), Mosquitto {ver('mosquitto')}, all with default settings "
      "but for loopback ports and a temporary data directory")
    w(f"- {a.rounds} rounds of {a.duration} s per run (S7: 3 s holding the connections, on "
      "freshly started brokers)")
    three = lambda v: " ".join((v or "").split()[:3])  # noqa: E731
    w(f"- Load average (1/5/15 min) before: {three(a.load_before)}; after: {three(a.load_after)}; "
      f"1-minute load at the start of each run: median {fmt(med(loads))}, max {fmt(max(loads) if loads else None)}. "
      "The load average counts the benchmark itself (broker and client keep both cores "
      "busy), so the noise is measured directly: the CPU time that processes other than "
      "the broker and the client used during each run (`others' CPU s` below; from "
      "/proc/stat). "
      f"Median over all runs: {fmt(med(others))} CPU s per run, max {fmt(max(others) if others else None)} "
      f"(a {a.duration} s run on 2 cores has {2 * int(a.duration or 0)} CPU s).")
    w("")
    w("## Results against the goals")
    w("")
    w("| case | metric | Switchyard | reference | ratio | goal | met |")
    w("|---|---|---:|---:|---:|---|---|")
    for case in order:
        key, unit, higher, goal, check = goal_for(case)
        ref = reference(case)
        s = med(metric(r, key) for r in runs[(case, "switchyard")])
        rv = med(metric(r, key) for r in runs[(case, ref)])
        ratio = None
        if s is not None and rv:
            ratio = s / rv if higher else (rv / s if s else None)
        met = ""
        if check == "cpu":
            s_cpu = med(metric(r, "msgs_per_cpu_sec") for r in runs[(case, "switchyard")])
            r_cpu = med(metric(r, "msgs_per_cpu_sec") for r in runs[(case, ref)])
            if ratio is not None and s_cpu and r_cpu:
                met = "yes" if ratio >= 1 and s_cpu >= r_cpu else "no"
                goal += f" (msg/CPU s {s_cpu / r_cpu:.2f}x)"
        elif check is not None and s is not None:
            met = "yes" if check(s, rv or 0, ratio or 0) else "no"
        fails = failures.get((case, "switchyard"), 0) + failures.get((case, ref), 0)
        if fails:
            met += f" ({fails} failed runs)"
        w(f"| {case} | {unit} | {fmt(s, key)} | {fmt(rv, key)} ({ref}) | "
          f"{'-' if ratio is None else f'{ratio:.2f}x'} | {goal} | {met} |")
    w("")
    w("Ratios are Switchyard over the reference for throughput and reference over")
    w("Switchyard for latency and memory, so above 1 is always better for Switchyard.")
    w("")
    unlimited = [c for c in order if c in UNLIMITED_GOALS]
    if unlimited:
        w("### Memory and latency at unlimited rate (issue 11)")
        w("")
        w("| case | Switchyard peak RSS MB | reference | Switchyard p99 ms | reference | goal | met |")
        w("|---|---:|---:|---:|---:|---|---|")
        for case in unlimited:
            rss_goal, p99_goal = UNLIMITED_GOALS[case]
            ref = reference(case)
            g = lambda b, k: med(metric(r, k) for r in runs[(case, b)])  # noqa: E731
            s_hwm, r_hwm = g("switchyard", "hwm_kb"), g(ref, "hwm_kb")
            s_p99, r_p99 = g("switchyard", "p99_us"), g(ref, "p99_us")
            mb = lambda kb: None if kb is None else kb / 1024  # noqa: E731
            ms = lambda us: None if us is None else us / 1000  # noqa: E731
            goal = f"RSS < {rss_goal} MB" + (f", p99 < {p99_goal} ms" if p99_goal else "")
            met = ""
            if s_hwm is not None and s_p99 is not None:
                ok = s_hwm / 1024 < rss_goal and (p99_goal is None or s_p99 / 1000 < p99_goal)
                met = "yes" if ok else "no"
            w(f"| {case} | {fmt(mb(s_hwm))} | {fmt(mb(r_hwm))} ({ref}) | {fmt(ms(s_p99))} | "
              f"{fmt(ms(r_p99))} | {goal} | {met} |")
        w("")
        w("10 s runs (issue 11 states 30 s for the 100 x 100 case).")
        w("")
    w("## Details (medians)")
    w("")
    w("| case | broker | sent/s | received/s | MB/s | p50 us | p99 us | p99.9 us | max us | broker CPU s | msg per CPU s | peak RSS MB | bytes/idle conn | reads MB (disk) | client CPU s | others' CPU s |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in order:
        for broker in ["switchyard", reference(case)]:
            rs = runs[(case, broker)]
            if not rs:
                w(f"| {case} | {broker} | failed ||||||||||||| |")
                continue
            g = lambda k: med(metric(r, k) for r in rs)  # noqa: E731
            hwm = g("hwm_kb")
            w(f"| {case} | {broker} | {fmt(g('send_rate'))} | {fmt(g('recv_rate'))} | "
              f"{fmt(g('recv_mb_per_sec'))} | {fmt(g('p50_us'), '_us')} | {fmt(g('p99_us'), '_us')} | "
              f"{fmt(g('p999_us'), '_us')} | {fmt(g('max_us'), '_us')} | {fmt(g('cpu_secs'))} | "
              f"{fmt(g('msgs_per_cpu_sec'))} | {fmt(hwm / 1024 if hwm else None)} | "
              f"{fmt(g('idle_bytes_per_conn'), 'idle_bytes_per_conn')} | "
              f"{fmt(g('read_syscall_bytes'))} ({fmt(g('disk_read_bytes'))}) | {fmt(g('client_cpu_secs'))} | "
              f"{fmt(g('other_cpu_secs'))} |")
    w("")
    if a.cases:
        w("## Cases")
        w("")
        w("Each case runs `switchyard-perf --protocol P --port PORT --broker-pid PID ARGS -z DURATION --json`")
        w("against both brokers (16-byte bodies unless `-s` says otherwise; `-x`/`-y` producers/consumers,")
        w("`-r` total msg/s, `-c` confirm window, `-q` prefetch, `-n` multi-ack every N).")
        w("")
        w("| case | reference | protocol | arguments |")
        w("|---|---|---|---|")
        for line in open(a.cases):
            parts = line.strip().split("|")
            if len(parts) == 4:
                w(f"| {parts[0]} | {parts[1]} | {parts[2]} | `{parts[3]}` |")
        w("")
    errors = sorted({e for rs in runs.values() for r in rs for e in r.get("errors", [])})
    if errors or failures:
        w("## Errors seen")
        w("")
        for (case, broker), n in sorted(failures.items()):
            w(f"- {case} on {broker}: {n} run(s) failed or reported errors")
        for e in errors[:20]:
            w(f"- `{e}`")
        w("")
    if a.notes:
        try:
            w(open(a.notes).read().rstrip())
            w("")
        except OSError:
            pass
    open(a.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

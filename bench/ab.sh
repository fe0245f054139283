#!/usr/bin/env bash
# A/B of two Switchyard binaries on one scenario (default S1: AMQP, 1 publisher,
# 1 consumer, 16-byte messages), alternating A and B each round so that the
# shared machine's noise falls on both alike. Prints each run's receive rate
# and the medians. Used to check that a change does not slow the message path
# (issue 9: statistics must stay within 3% of S1 without them).
#
#   bench/ab.sh BIN_A BIN_B [ROUNDS=3] [DURATION=10] [PERF_ARGS="-x 1 -y 1"]
#
# PERF defaults to target/release/switchyard-perf. Each broker gets config.toml
# (CONFIG_A / CONFIG_B: another file for that side, e.g. an older binary's own
# config.toml, which rejects keys added since) with loopback ports of its own and
# a temporary data directory, and is stopped after its run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"
a="$1" b="$2" rounds="${3:-3}" duration="${4:-10}" args="${5:--x 1 -y 1}"
perf="${PERF:-$repo/target/release/switchyard-perf}"
tmp="$(mktemp -d)"
pid=""
cleanup() { [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))

run() {
    local bin="$1" label="$2" config="$3"
    rm -rf "$tmp/data" "$tmp/ready.json"
    sy_config "$config" "$tmp/sy.toml" "$tmp/data" amqp="\"127.0.0.1:$port\""
    "$bin" --config "$tmp/sy.toml" --ready-file "$tmp/ready.json" >"$tmp/sy.log" 2>&1 &
    pid=$!
    sy_wait_ready "$tmp/ready.json" "$tmp/sy.log"
    # shellcheck disable=SC2086 # word splitting of the argument list is wanted
    "$perf" --protocol amqp --port "$port" --broker-pid "$pid" $args -z "$duration" --quiet --json \
        --label "$label" >>"$tmp/results.jsonl"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}

for r in $(seq "$rounds"); do
    run "$a" "A|$r" "${CONFIG_A:-$repo/config.toml}"
    run "$b" "B|$r" "${CONFIG_B:-$repo/config.toml}"
done
python3 - "$tmp/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rate, eff = {}, {}
for r in rows:
    side = r["label"].split("|")[0]
    per_cpu = (r.get("broker") or {}).get("msgs_per_cpu_sec") or 0.0
    rate.setdefault(side, []).append(r["recv_rate"])
    eff.setdefault(side, []).append(per_cpu)
    other = r.get("other_cpu_secs") or 0.0
    print(f'{r["label"]:6} {r["recv_rate"]:>10,.0f} msg/s  {per_cpu:>10,.0f} msg per broker CPU s  (other processes: {other:.1f} CPU s)')
for name, d in (("msg/s", rate), ("msg per broker CPU s", eff)):
    ma, mb = statistics.median(d["A"]), statistics.median(d["B"])
    print(f"median {name}: A {ma:,.0f}  B {mb:,.0f}  B/A {mb/ma:.4f} ({(mb/ma-1)*100:+.2f}%)")
PY

#!/usr/bin/env bash
# Issue 11's MQTT flood goal: 20 MQTT QoS 0 publishers at unlimited rate for 10 s
# feeding one subscriber (to perf/#) that never reads its socket, under a 128 MiB
# memory watermark. The goal: the broker's peak resident set stays within start +
# 1.25 x watermark. Run twice: with the shipped [mqtt] max_queued_messages (1000,
# Mosquitto's default: the stalled subscriber's queue drops its oldest) and with 0
# (no limit: flow control and the memory alarm must bound it).
#
#   bench/mqtt-flood.sh [BIN]        # BIN defaults to target/release/switchyard
#
# PERF defaults to target/release/switchyard-perf. The broker gets config.toml with
# loopback ports of its own and a temporary data directory; the stalled subscriber is
# a raw MQTT 3.1.1 client in Python (CONNECT, SUBSCRIBE, then no read, 4 KiB receive
# buffer).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"
bin="${1:-$repo/target/release/switchyard}"
perf="${PERF:-$repo/target/release/switchyard-perf}"
tmp="$(mktemp -d)"
pid="" sub=""
cleanup() {
    [[ -n "$sub" ]] && kill "$sub" 2>/dev/null
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
watermark=$((128 * 1024 * 1024))

kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }

run() {
    local max_queued="$1"
    rm -rf "$tmp/data" "$tmp/ready.json"
    sy_config "$repo/config.toml" "$tmp/sy.toml" "$tmp/data" mqtt="\"127.0.0.1:$port\"" \
        memory_high_watermark_bytes="$watermark" max_queued_messages="$max_queued"
    "$bin" --config "$tmp/sy.toml" --ready-file "$tmp/ready.json" >"$tmp/broker.log" 2>&1 &
    pid=$!
    sy_wait_ready "$tmp/ready.json" "$tmp/broker.log"
    sleep 1
    python3 - "$port" <<'PY' &
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(("127.0.0.1", int(sys.argv[1])))
connect = b"\x00\x04MQTT\x04\x02\x00\x00" + b"\x00\x07stalled"
s.sendall(bytes([0x10, len(connect)]) + connect)
s.recv(4)
subscribe = b"\x00\x01" + b"\x00\x06perf/#" + b"\x00"
s.sendall(bytes([0x82, len(subscribe)]) + subscribe)
time.sleep(30)  # and never read again
PY
    sub=$!
    sleep 1
    local start
    start=$(kb VmRSS)
    "$perf" --protocol mqtt --port "$port" --broker-pid "$pid" -x 20 -y 0 --qos 0 -z 10 \
        --json 2>/dev/null | tail -1 >"$tmp/result.json"
    local peak sent alarms
    peak=$(kb VmHWM)
    sent=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["sent"]))' "$tmp/result.json")
    alarms=$(grep -c "memory alarm set" "$tmp/broker.log" || true)
    printf '| %s | %s | %d | %d | %d | %d | %s |\n' "$max_queued" "$sent" $((start / 1024)) \
        $((peak / 1024)) $(((peak - start) / 1024)) $((watermark * 5 / 4 / 1048576)) "$alarms"
    kill "$sub" 2>/dev/null || true
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid="" sub=""
}

echo "| max_queued_messages | messages sent | start MB | peak MB | peak over start MB | bound MB | memory alarms |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
run 1000
run 0

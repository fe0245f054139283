#!/usr/bin/env bash
# Runs the benchmark scenarios S1-S11 (issue 6) against Switchyard and, in the same
# run and alternating, against the reference broker of each protocol: RabbitMQ
# (AMQP, STOMP) and Mosquitto (MQTT), both from Debian's packages. Writes the
# medians and ratios to BENCHMARKS.md (or $OUT).
#
#   bench/compare.sh                  # everything, 3 rounds of 10 s per run
#   ROUNDS=5 DURATION=15 bench/compare.sh
#   ONLY="S1 S2" bench/compare.sh     # some scenarios (S7 is the idle-connection one)
#   ONLY=FLOOD bench/compare.sh       # the flood case alone (issue 11): a publisher with no
#                                     # consumer under a 128 MiB memory watermark
#   ONLY=BACKLOG bench/compare.sh     # 1 M queued 16-byte messages: bytes per message (issue 11)
#   ONLY=ST bench/compare.sh          # the stream cases (issue 13), against RabbitMQ's
#                                     # stream plugin
#
# Not part of the test suite: it takes about half an hour. Every broker it starts
# listens on loopback ports of its own (so a RabbitMQ already running on 5672 is
# left alone) with its data in a temporary directory, and is stopped at the end;
# it stops nothing it did not start.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
ONLY="${ONLY:-}"
OUT="${OUT:-$repo/BENCHMARKS.md}"
IDLE_CONNS="${IDLE_CONNS:-10000}"
# How long the backlog case (BACKLOG) publishes at 200,000 msg/s: 5 s is 1 M messages.
BACKLOG_SECS="${BACKLOG_SECS:-5}"
# The memory watermark of the flood case (FLOOD), for both brokers.
FLOOD_WATERMARK="${FLOOD_WATERMARK:-134217728}"
# Set (to bytes) while the flood case runs: the brokers start with that watermark.
WATERMARK=""

# Ports: Switchyard, RabbitMQ and Mosquitto each on their own, none the defaults.
SY_AMQP=5872 SY_MQTT=1893 SY_MQTT_WS=15875 SY_STOMP=61813 SY_STOMP_WS=15874 SY_STREAM=5952
RB_AMQP=5772 RB_DIST=25772 RB_MQTT=1983 RB_MQTT_WS=15775 RB_STOMP=61713 RB_STOMP_WS=15774 RB_STREAM=5752
MQ_MQTT=1993 MQ_MQTT_WS=15795

tmp="$(mktemp -d /tmp/switchyard-bench.XXXXXX)"
results="$tmp/results.jsonl"
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# 10k idle connections need 10k descriptors in the client and in each broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------- installation
need=()
command -v /usr/lib/rabbitmq/bin/rabbitmq-server >/dev/null 2>&1 || [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || need+=(rabbitmq-server)
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
if ((${#need[@]})); then
    log "installing ${need[*]} from Debian's packages"
    # Keep the packages' own services from starting on the default ports.
    policy_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    ((policy_added)) && rm -f /usr/sbin/policy-rc.d
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

# ---------------------------------------------------------------- build
log "building Switchyard and switchyard-perf (release)"
cargo build --release --locked -p switchyard -p switchyard-perf >&2
target="${CARGO_TARGET_DIR:-$repo/target}"
SY_BIN="$target/release/switchyard"
PERF="$target/release/switchyard-perf"

# ---------------------------------------------------------------- brokers
sy_pid="" rb_pid="" mq_pid=""

start_switchyard() {
    rm -rf "$tmp/sy-data"
    sy_config config.toml "$tmp/switchyard.toml" "$tmp/sy-data" \
        amqp="\"127.0.0.1:$SY_AMQP\"" mqtt="\"127.0.0.1:$SY_MQTT\"" \
        mqtt_ws="\"127.0.0.1:$SY_MQTT_WS\"" stomp="\"127.0.0.1:$SY_STOMP\"" \
        stomp_ws="\"127.0.0.1:$SY_STOMP_WS\"" stream="\"127.0.0.1:$SY_STREAM\"" \
        ${WATERMARK:+memory_high_watermark_bytes="$WATERMARK"}
    rm -f "$tmp/sy-ready.json"
    "$SY_BIN" --config "$tmp/switchyard.toml" --ready-file "$tmp/sy-ready.json" >"$tmp/switchyard.log" 2>&1 &
    sy_pid=$!
    sy_wait_ready "$tmp/sy-ready.json" "$tmp/switchyard.log"
}
stop_switchyard() {
    [[ -n "$sy_pid" ]] || return 0
    kill "$sy_pid" 2>/dev/null || true
    wait "$sy_pid" 2>/dev/null || true
    sy_pid=""
}

RB_NODE="switchyard-bench-$$@localhost"
rb_env() {
    env HOME="$tmp/rabbit" RABBITMQ_NODENAME="$RB_NODE" \
        RABBITMQ_CONFIG_FILE="$tmp/rabbit/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$tmp/rabbit/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$tmp/rabbit/mnesia" RABBITMQ_LOG_BASE="$tmp/rabbit/log" \
        RABBITMQ_PID_FILE="$tmp/rabbit/pid" RABBITMQ_DIST_PORT="$RB_DIST" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RB_AMQP" "$@"
}
start_rabbitmq() {
    rm -rf "$tmp/rabbit"
    mkdir -p "$tmp/rabbit/log" "$tmp/rabbit/mnesia"
    cat >"$tmp/rabbit/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$RB_AMQP
mqtt.listeners.tcp.default = 127.0.0.1:$RB_MQTT
stomp.listeners.tcp.1 = 127.0.0.1:$RB_STOMP
web_mqtt.tcp.ip = 127.0.0.1
web_mqtt.tcp.port = $RB_MQTT_WS
web_stomp.tcp.ip = 127.0.0.1
web_stomp.tcp.port = $RB_STOMP_WS
stream.listeners.tcp.1 = 127.0.0.1:$RB_STREAM
EOF
    if [[ -n "$WATERMARK" ]]; then
        echo "vm_memory_high_watermark.absolute = $WATERMARK" >>"$tmp/rabbit/rabbitmq.conf"
    fi
    rb_env /usr/lib/rabbitmq/bin/rabbitmq-plugins enable --offline \
        rabbitmq_stomp rabbitmq_mqtt rabbitmq_web_stomp rabbitmq_web_mqtt rabbitmq_stream >/dev/null
    rb_env /usr/lib/rabbitmq/bin/rabbitmq-server >"$tmp/rabbit/stdout.log" 2>&1 &
    rb_env timeout 120 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RB_NODE" wait "$tmp/rabbit/pid" --timeout 120 >/dev/null
    rb_pid="$(cat "$tmp/rabbit/pid")"
}
stop_rabbitmq() {
    [[ -n "$rb_pid" ]] || return 0
    rb_env timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RB_NODE" stop >/dev/null 2>&1 || kill "$rb_pid" 2>/dev/null || true
    # `rabbitmqctl stop` returns before the node's process has gone: a node
    # started at once would find the distribution port taken and crash.
    for _ in $(seq 100); do
        kill -0 "$rb_pid" 2>/dev/null || break
        sleep 0.1
    done
    for _ in $(seq 100); do
        ss -Hltn "sport = :$RB_DIST" 2>/dev/null | grep -q . || break
        sleep 0.1
    done
    rb_pid=""
}

start_mosquitto() {
    cat >"$tmp/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
persistence false
listener $MQ_MQTT 127.0.0.1
listener $MQ_MQTT_WS 127.0.0.1
protocol websockets
EOF
    "$MOSQUITTO" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
    mq_pid=$!
    for _ in $(seq 50); do
        (exec 9<>"/dev/tcp/127.0.0.1/$MQ_MQTT") 2>/dev/null && return 0
        sleep 0.1
    done
    log "Mosquitto did not start:"; cat "$tmp/mosquitto.log" >&2; return 1
}
stop_mosquitto() {
    [[ -n "$mq_pid" ]] || return 0
    kill "$mq_pid" 2>/dev/null || true
    wait "$mq_pid" 2>/dev/null || true
    mq_pid=""
}

cleanup() {
    stop_switchyard; stop_rabbitmq; stop_mosquitto
}
trap cleanup EXIT

# ---------------------------------------------------------------- scenarios
# One line per case: id | reference (rabbitmq or mosquitto) | protocol/transport
# key | switchyard-perf arguments. The same arguments go to both brokers; only the
# port differs.
cases() {
    cat <<'EOF'
S1|rabbitmq|amqp|-x 1 -y 1
S2|rabbitmq|amqp|-x 1 -y 1 --persistent -c 192 -q 200 -n 100
S3|rabbitmq|amqp|-x 1 -y 10 --topology fanout
S4-amqp-1k|rabbitmq|amqp|-x 1 -y 1 -r 1000
S4-amqp-10k|rabbitmq|amqp|-x 1 -y 1 -r 10000
S4-amqp-50k|rabbitmq|amqp|-x 1 -y 1 -r 50000
S4-mqtt-1k|mosquitto|mqtt|-x 1 -y 1 -r 1000
S4-mqtt-10k|mosquitto|mqtt|-x 1 -y 1 -r 10000
S4-mqtt-50k|mosquitto|mqtt|-x 1 -y 1 -r 50000
S5-qos0-1x1|mosquitto|mqtt|-x 1 -y 1 --qos 0
S5-qos1-1x1|mosquitto|mqtt|-x 1 -y 1 --qos 1 -c 100
S5-qos0-100x100|mosquitto|mqtt|-x 100 -y 100 --topology pairs --qos 0
S5-qos1-100x100|mosquitto|mqtt|-x 100 -y 100 --topology pairs --qos 1 -c 100
S6|mosquitto|mqtt|-x 5 -y 1000 --topology fanout -r 500
S8-plain|rabbitmq|stomp|-x 1 -y 1 -s 1024
S8-receipts|rabbitmq|stomp|-x 1 -y 1 -s 1024 -c 100
S9-mqtt-ws|mosquitto|mqtt-ws|-x 1 -y 1 -s 1024
S9-stomp-ws|rabbitmq|stomp-ws|-x 1 -y 1 -s 1024
S10-amqp|rabbitmq|amqp|-x 1 -y 1 -s 65536
S10-mqtt|mosquitto|mqtt|-x 1 -y 1 -s 65536
S11|rabbitmq|amqp|-x 1 -y 1 --topic-bindings 100000
ST-protocol|rabbitmq|stream|-x 1 -y 1 -c 10000
ST-amqp|rabbitmq|amqp|--queue-type stream -x 1 -y 1 -c 1000 -q 1000 -n 100
ST-fill|rabbitmq|stream|--stream perf-replay -x 1 -y 0 -c 10000
ST-replay-1|rabbitmq|stream|--stream perf-replay -x 0 -y 1 --stream-offset first
ST-replay-100|rabbitmq|stream|--stream perf-replay -x 0 -y 100 --stream-offset first
EOF
}
idle_cases() {
    cat <<EOF
S7-mqtt|mosquitto|mqtt|-x 0 -y 0 --idle $IDLE_CONNS
S7-amqp|rabbitmq|amqp|-x 0 -y 0 --idle $IDLE_CONNS --idle-channels 2
S7-stomp|rabbitmq|stomp|-x 0 -y 0 --idle $IDLE_CONNS
EOF
}

# A publisher flooding a queue nobody consumes, on fresh brokers with a memory
# watermark of FLOOD_WATERMARK: the peak resident set over the broker's start.
flood_cases() {
    cat <<EOF
FLOOD|rabbitmq|amqp|-x 1 -y 0
EOF
}

# A backlog of 1 M 16-byte transient messages (200,000 msg/s for BACKLOG_SECS
# under confirms) in a queue nobody consumes, on fresh brokers: resident bytes
# per queued message (issue 11: the broker's growth over the run, sampled 3 s
# after it so that only what stays is counted, / confirmed).
backlog_cases() {
    cat <<EOF
BACKLOG|rabbitmq|amqp|-x 1 -y 0 -c 1000 -r 200000 --settle 3
EOF
}

wanted() {
    [[ -z "$ONLY" ]] && return 0
    local id="$1" w
    for w in $ONLY; do [[ "$id" == "$w" || "$id" == "$w"-* ]] && return 0; done
    return 1
}

# Protocol arguments and the broker pid for `broker` and a protocol key.
target_args() {
    local broker="$1" key="$2"
    case "$broker/$key" in
        switchyard/amqp) echo "--protocol amqp --port $SY_AMQP --broker-pid $sy_pid" ;;
        switchyard/mqtt) echo "--protocol mqtt --port $SY_MQTT --broker-pid $sy_pid" ;;
        switchyard/mqtt-ws) echo "--protocol mqtt --transport ws --port $SY_MQTT_WS --broker-pid $sy_pid" ;;
        switchyard/stomp) echo "--protocol stomp --port $SY_STOMP --broker-pid $sy_pid" ;;
        switchyard/stomp-ws) echo "--protocol stomp --transport ws --port $SY_STOMP_WS --broker-pid $sy_pid" ;;
        switchyard/stream) echo "--protocol stream --port $SY_STREAM --broker-pid $sy_pid" ;;
        rabbitmq/amqp) echo "--protocol amqp --port $RB_AMQP --broker-pid $rb_pid" ;;
        rabbitmq/stomp) echo "--protocol stomp --port $RB_STOMP --broker-pid $rb_pid" ;;
        rabbitmq/stomp-ws) echo "--protocol stomp --transport ws --port $RB_STOMP_WS --broker-pid $rb_pid" ;;
        rabbitmq/stream) echo "--protocol stream --port $RB_STREAM --broker-pid $rb_pid" ;;
        mosquitto/mqtt) echo "--protocol mqtt --port $MQ_MQTT --broker-pid $mq_pid" ;;
        mosquitto/mqtt-ws) echo "--protocol mqtt --transport ws --port $MQ_MQTT_WS --broker-pid $mq_pid" ;;
        *) log "no target for $broker/$key"; return 1 ;;
    esac
}

run_case() {
    local round="$1" id="$2" broker="$3" key="$4" args="$5" duration="$6" targs
    targs="$(target_args "$broker" "$key")"
    # A replay reads what ST-fill wrote: from the disk, not the page cache
    # (when this runs as root), so the disk reads it reports are real.
    if [[ "$id" == ST-replay* ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    fi
    log "round $round: $id on $broker (load $(cut -d' ' -f1 /proc/loadavg))"
    # shellcheck disable=SC2086 # word splitting of the argument lists is wanted
    if ! timeout "$((duration + 900))" "$PERF" $targs $args -z "$duration" --quiet --json \
        --label "$id|$broker|$round|$(cut -d' ' -f1 /proc/loadavg)" >>"$results" 2>"$tmp/perf.err"; then
        log "  failed: $(tail -1 "$tmp/perf.err")"
        printf '{"label":"%s|%s|%s|0","failed":true}\n' "$id" "$broker" "$round" >>"$results"
    fi
}

{ idle_cases; flood_cases; backlog_cases; cases; } | while IFS='|' read -r id rest; do
    if wanted "$id"; then echo "$id|$rest"; fi
done >"$tmp/cases.txt"
load_before="$(cat /proc/loadavg)"
started_at="$(date -u +%Y-%m-%dT%H:%MZ)"

# Runs the cases a function lists (`$1`), each round and broker on a freshly
# started broker (after `$2` seconds of rest), for `$3` seconds each: what these
# measure (memory) must be the run's own, not what earlier traffic left.
fresh_runs() {
    local cases_fn="$1" rest="$2" duration="$3" round id ref key args broker
    for round in $(seq "$ROUNDS"); do
        # The list comes on fd 3: the brokers' tools would eat it from stdin.
        while IFS='|' read -r -u 3 id ref key args; do
            wanted "$id" || continue
            for broker in switchyard "$ref"; do
                "start_$broker"
                sleep "$rest"
                run_case "$round" "$id" "$broker" "$key" "$args" "$duration"
                "stop_$broker"
            done
        done 3< <("$cases_fn")
    done
}

# S7 first: resident memory per idle connection is only meaningful before
# traffic has grown (and freed) the heap.
if grep -q '^S7' "$tmp/cases.txt"; then
    fresh_runs idle_cases 2 3
fi
# FLOOD: the peak resident set is this run's, under FLOOD_WATERMARK.
if grep -q '^FLOOD' "$tmp/cases.txt"; then
    WATERMARK="$FLOOD_WATERMARK"
    fresh_runs flood_cases 0 "$DURATION"
    WATERMARK=""
fi
# BACKLOG: the growth is this backlog's alone.
if grep -q '^BACKLOG' "$tmp/cases.txt"; then
    fresh_runs backlog_cases 2 "$BACKLOG_SECS"
fi

if grep -qv -e '^S7' -e '^FLOOD' -e '^BACKLOG' "$tmp/cases.txt"; then
start_switchyard
start_rabbitmq
start_mosquitto
for round in $(seq "$ROUNDS"); do
    while IFS='|' read -r -u 3 id ref key args; do
        wanted "$id" || continue
        # Alternate which broker goes first, so neither always gets a cooler machine.
        if ((round % 2)); then order=(switchyard "$ref"); else order=("$ref" switchyard); fi
        for broker in "${order[@]}"; do
            run_case "$round" "$id" "$broker" "$key" "$args" "$DURATION"
        done
    done 3< <(cases)
done
fi
load_after="$(cat /proc/loadavg)"
cleanup

# ---------------------------------------------------------------- report
cp "$results" "$repo/bench/last-results.jsonl"
python3 "$repo/bench/report.py" "$results" "$OUT" \
    --rounds "$ROUNDS" --duration "$DURATION" --started "$started_at" \
    --load-before "$load_before" --load-after "$load_after" \
    --cases "$tmp/cases.txt" --notes "$repo/bench/notes.md" \
    --command "ROUNDS=$ROUNDS DURATION=$DURATION${ONLY:+ ONLY=\"$ONLY\"} bench/compare.sh"
log "wrote $OUT (raw results: bench/last-results.jsonl)"

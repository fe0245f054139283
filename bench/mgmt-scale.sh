#!/usr/bin/env bash
# Management and Prometheus at scale (issue 9's performance goals): creates
# QUEUES (default 10,000) queues on Switchyard and on RabbitMQ (Debian's
# rabbitmq-server, with rabbitmq_management and rabbitmq_prometheus) and times,
# broker by broker and alternating round by round so the shared machine's noise
# falls on both alike:
#
#   GET /api/queues?page=1&page_size=500                      (first page)
#   GET /api/queues?page=1&page_size=500&sort=name&sort_reverse=true
#   GET /api/queues?page=1&page_size=500&name=q-0999          (filtered, substring)
#   GET /api/queues?page=1&page_size=500&name=^q-09.*5$&use_regex=true
#   GET /api/overview
#   GET :prometheus/metrics                                   (aggregated)
#   GET :prometheus/metrics/per-object
#
# Each request is a fresh connection (as a scraper or a CLI makes it); the
# figure is the time to the last byte of the body. Prints one markdown table
# (median / min / max of ROUNDS requests, body size) and the load average seen
# before and after each broker's rounds; the raw timings go to $RAW.
#
#   bench/mgmt-scale.sh                      # 10,000 queues, 5 rounds
#   QUEUES=2000 ROUNDS=3 bench/mgmt-scale.sh
#   SY_BIN=target/release/switchyard bench/mgmt-scale.sh   # skip the build
#
# Not part of the test suite (a few minutes, most of it RabbitMQ creating its
# queues). Both brokers listen on loopback ports of their own with their data in
# a temporary directory and are stopped at the end; nothing else is touched.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

QUEUES="${QUEUES:-10000}"
ROUNDS="${ROUNDS:-5}"
tmp="$(mktemp -d /tmp/switchyard-mgmt-scale.XXXXXX)"
RAW="${RAW:-$tmp/raw.jsonl}"
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

SY_AMQP=5882 SY_MGMT=15882 SY_PROM=15892
RB_AMQP=5782 RB_DIST=25782 RB_MGMT=15782 RB_PROM=15792

if [[ -z "${SY_BIN:-}" ]]; then
    log "building Switchyard (release)"
    cargo build --release --locked -p switchyard >&2
    SY_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/switchyard"
fi
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || {
    log "rabbitmq-server is not installed (bench/compare.sh installs it)"; exit 1; }

sy_pid="" rb_pid=""
epmd_before=0
pgrep -x epmd >/dev/null 2>&1 && epmd_before=1
RB_NODE="switchyard-mgmt-bench-$$@localhost"
rb_env() {
    env HOME="$tmp/rabbit" RABBITMQ_NODENAME="$RB_NODE" \
        RABBITMQ_CONFIG_FILE="$tmp/rabbit/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$tmp/rabbit/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$tmp/rabbit/mnesia" RABBITMQ_LOG_BASE="$tmp/rabbit/log" \
        RABBITMQ_PID_FILE="$tmp/rabbit/pid" RABBITMQ_DIST_PORT="$RB_DIST" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RB_AMQP" "$@"
}
cleanup() {
    if [[ -n "$sy_pid" ]]; then kill "$sy_pid" 2>/dev/null || true; wait "$sy_pid" 2>/dev/null || true; fi
    if [[ -n "$rb_pid" ]]; then
        rb_env timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RB_NODE" stop >/dev/null 2>&1 \
            || kill "$rb_pid" 2>/dev/null || true
    fi
    # The Erlang port mapper the node started, unless one was running before.
    if ((!epmd_before)); then
        /usr/lib/erlang/bin/epmd -kill >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp/sy-data" "$tmp/rabbit/mnesia"
}
trap cleanup EXIT

# ---------------------------------------------------------------- Switchyard
sy_config config.toml "$tmp/switchyard.toml" "$tmp/sy-data" amqp="\"127.0.0.1:$SY_AMQP\"" \
    management="\"127.0.0.1:$SY_MGMT\"" prometheus="\"127.0.0.1:$SY_PROM\""
"$SY_BIN" --config "$tmp/switchyard.toml" --ready-file "$tmp/sy-ready.json" >"$tmp/switchyard.log" 2>&1 &
sy_pid=$!
sy_wait_ready "$tmp/sy-ready.json" "$tmp/switchyard.log"

# ---------------------------------------------------------------- RabbitMQ
mkdir -p "$tmp/rabbit/log" "$tmp/rabbit/mnesia"
cat >"$tmp/rabbit/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$RB_AMQP
management.tcp.ip = 127.0.0.1
management.tcp.port = $RB_MGMT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $RB_PROM
EOF
rb_env /usr/lib/rabbitmq/bin/rabbitmq-plugins enable --offline \
    rabbitmq_management rabbitmq_prometheus >/dev/null
log "starting RabbitMQ"
rb_env /usr/lib/rabbitmq/bin/rabbitmq-server >"$tmp/rabbit/stdout.log" 2>&1 &
rb_env timeout 180 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RB_NODE" wait "$tmp/rabbit/pid" --timeout 180 >/dev/null
rb_pid="$(cat "$tmp/rabbit/pid")"
rb_env timeout 120 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RB_NODE" await_startup >/dev/null

# ---------------------------------------------------------------- queues and timings
python3 - "$QUEUES" "$ROUNDS" "$RAW" \
    "Switchyard|127.0.0.1:$SY_MGMT|127.0.0.1:$SY_PROM" \
    "RabbitMQ $(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null | cut -d- -f1)|127.0.0.1:$RB_MGMT|127.0.0.1:$RB_PROM" <<'PY'
import base64, http.client, json, os, statistics, sys, time

queues, rounds, raw_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
brokers = [a.split("|") for a in sys.argv[4:]]
auth = "Basic " + base64.b64encode(b"guest:guest").decode()

def request(addr, method, path, body=None, timeout=600):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Authorization": auth}
    if body is not None:
        headers["Content-Type"] = "application/json"
    t = time.perf_counter()
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    dt = time.perf_counter() - t
    c.close()
    return r.status, data, dt

def load():
    return os.getloadavg()[0]

defs = json.dumps({"queues": [
    {"name": f"q-{i:05}", "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}
    for i in range(queues)]})
imported = {}  # broker -> seconds for POST /api/definitions
for name, mgmt, _ in brokers:
    status, data, dt = request(mgmt, "POST", "/api/definitions", defs)
    if status // 100 != 2:
        sys.exit(f"{name}: importing {queues} queues failed: {status} {data[:200]!r}")
    # RabbitMQ's listings read its stats database: wait until it lists them all.
    deadline = time.time() + 300
    while True:
        _, body, _ = request(mgmt, "GET", "/api/overview")
        n = json.loads(body).get("object_totals", {}).get("queues", 0)
        if n >= queues or time.time() > deadline:
            break
        time.sleep(1)
    print(f"{name}: {queues} queues created in {dt:.1f} s (listed: {n})", file=sys.stderr)
    imported[name] = dt

cases = [
    ("`/api/queues?page=1&page_size=500`", "mgmt", "/api/queues?page=1&page_size=500"),
    ("same, `sort=name&sort_reverse=true`", "mgmt",
     "/api/queues?page=1&page_size=500&sort=name&sort_reverse=true"),
    ("same, `name=q-0999` (substring)", "mgmt", "/api/queues?page=1&page_size=500&name=q-0999"),
    ("same, `name=^q-09.*5$&use_regex=true`", "mgmt",
     "/api/queues?page=1&page_size=500&name=%5Eq-09.%2A5%24&use_regex=true"),
    ("`/api/overview`", "mgmt", "/api/overview"),
    ("`/metrics` (aggregated)", "prom", "/metrics"),
    ("`/metrics/per-object`", "prom", "/metrics/per-object"),
]
times = {}  # (broker, case) -> [seconds]
sizes, statuses, loads = {}, {}, {}
raw = open(raw_path, "a")
for name, mgmt, prom in brokers:  # one warm-up request per case
    for label, where, path in cases:
        request(mgmt if where == "mgmt" else prom, "GET", path)
for r in range(rounds):
    order = brokers if r % 2 == 0 else list(reversed(brokers))
    for name, mgmt, prom in order:
        before = load()
        for label, where, path in cases:
            status, body, dt = request(mgmt if where == "mgmt" else prom, "GET", path)
            times.setdefault((name, label), []).append(dt)
            sizes[(name, label)] = len(body)
            statuses[(name, label)] = status
            raw.write(json.dumps({"broker": name, "case": path, "round": r, "status": status,
                                  "seconds": dt, "bytes": len(body)}) + "\n")
        loads.setdefault(name, []).extend([before, load()])

def ms(x):
    return f"{x * 1000:,.1f}" if x < 10 else f"{x * 1000:,.0f}"

def size(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"

names = [b[0] for b in brokers]
print(f"| request ({queues:,} queues; ms: median (min-max) of {rounds}) | "
      + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
for label, _, _ in cases:
    cells = []
    for n in names:
        t = times[(n, label)]
        st = statuses[(n, label)]
        cell = f"{ms(statistics.median(t))} ({ms(min(t))}-{ms(max(t))}), {size(sizes[(n, label)])}"
        if st != 200:
            cell = f"HTTP {st}"
        cells.append(cell)
    print(f"| {label} | " + " | ".join(cells) + " |")
print(f"| `POST /api/definitions` with {queues:,} durable queues (s, once) | "
      + " | ".join(f"{imported[n]:.1f}" for n in names) + " |")
print()
for n in names:
    l = loads[n]
    print(f"- {n}: 1-min load average {min(l):.1f}-{max(l):.1f} during its rounds")
PY

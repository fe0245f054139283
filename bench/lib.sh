# Shared by the bench scripts (sourced, not run). One way to give a Switchyard
# under test a configuration of its own and to wait for it to be ready.

# sy_config SRC OUT DATA_DIR [KEY=TOML_VALUE ...]
# Writes OUT: SRC (a config.toml) with `data_dir` set to DATA_DIR, every listener
# on a loopback port the kernel picks (so nothing the machine already runs on
# 5672, 15672, 5552... is touched), then each `KEY = ...` line set to TOML_VALUE,
# e.g. amqp='"127.0.0.1:5872"' or memory_high_watermark_bytes=134217728.
sy_config() {
    local src="$1" out="$2" data="$3"
    shift 3
    local listeners='amqp\|mqtt\|mqtt_ws\|stomp\|stomp_ws\|stream\|management\|prometheus'
    local edits=(-e "s#^data_dir = .*#data_dir = \"$data\"#"
        -e "s#^\($listeners\) = .*#\1 = \"127.0.0.1:0\"#")
    local kv
    for kv in "$@"; do
        edits+=(-e "s#^${kv%%=*} = .*#${kv%%=*} = ${kv#*=}#")
    done
    sed "${edits[@]}" "$src" >"$out"
}

# sy_wait_ready READY_FILE LOG: waits up to 10 s for the broker's ready file;
# on failure prints the end of its log and returns 1.
sy_wait_ready() {
    local _
    for _ in $(seq 100); do
        [[ -s "$1" ]] && return 0
        sleep 0.1
    done
    echo "Switchyard did not start:" >&2
    tail "$2" >&2
    return 1
}

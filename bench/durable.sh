#!/usr/bin/env bash
# Durable QoS 1 throughput per persistence.sync mode: 16 publishers -> 16 persistent
# subscribers, 64-byte payloads. Broker pinned to CPU 0, load generator to CPU 1.
# Usage: bench/durable.sh [seconds] [modes...]   (default: 10 s; batch always interval off)
# PIN=0 bench/durable.sh ...: no pinning (the broker may use both cores, shared with the load).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
shift || true
modes=${*:-batch always interval off}
cargo build --release -p halyard >/dev/null 2>&1
BIN=target/release/halyard
for mode in $modes; do
  work=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$work/h.toml" <<TOML
listen = ["tcp://127.0.0.1:$port"]
data_dir = "$work/data"
log_level = "warn"
max_queued_messages = 10000000
max_queued_bytes = 0
max_inflight_messages = 1000
[persistence]
sync = "$mode"
TOML
  # PIN=0: no pinning, broker and load generator share both cores.
  if [ "${PIN:-1}" = 0 ]; then pin_b=(); pin_l=(); else pin_b=(taskset -c 0); pin_l=(taskset -c 1); fi
  "${pin_b[@]}" "$BIN" serve --config "$work/h.toml" &
  broker=$!
  for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
    sleep 0.05
  done
  t0=$(awk '{print $14+$15}' "/proc/$broker/stat")
  out=$("${pin_l[@]}" "$BIN" bench pubsub --port "$port" --pubs 16 --subs 16 --qos 1 --size 64 --duration "$secs" --window 64 --persistent --json 2>/dev/null)
  t1=$(awk '{print $14+$15}' "/proc/$broker/stat")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$broker/status")
  kill -TERM "$broker"; wait "$broker" || true
  size=$(du -sk "$work/data" | cut -f1)
  python3 - "$mode" "$out" "$t0" "$t1" "$rss" "$size" <<'PY'
import json, os, sys
mode, out, t0, t1, rss, size = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
hz = os.sysconf("SC_CLK_TCK")
cpu_us = (t1 - t0) / hz * 1e6
per_msg = cpu_us / max(out["received"], 1)
lat = out["latency_us"]
print(f"| {mode} | {out['delivered_per_second']:,.0f} | {per_msg:.2f} | {out['lost']} | {out['duplicates']} "
      f"| {lat['p50']} / {lat['p99']} | {rss/1024:.0f} MB | {size/1024:.0f} MB |")
PY
  rm -rf "$work"
done

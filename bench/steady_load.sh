#!/usr/bin/env bash
# Data directory size under steady durable load: 16 publishers -> 16 persistent
# subscribers, QoS 1, 64-byte payloads, sync = batch, for MINUTES; the data directory's
# size is sampled every 30 s. Compaction must keep it bounded (issue 5).
# Usage: bench/steady_load.sh [minutes]   (default 10). Broker on CPU 0, load on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/interop/lib.sh
mins=${1:-10}
cargo build --release -p halyard >/dev/null 2>&1
BIN=target/release/halyard
work=$(mktemp -d)
trap 'kill $broker $load 2>/dev/null; rm -rf "$work"' EXIT
port=$(free_port)
cat >"$work/h.toml" <<TOML
listen = ["tcp://127.0.0.1:$port"]
data_dir = "$work/data"
log_level = "warn"
max_queued_messages = 10000000
max_queued_bytes = 0
max_inflight_messages = 1000
TOML
taskset -c 0 "$BIN" serve --config "$work/h.toml" &
broker=$!
wait_port "$port"
secs=$((mins * 60))
taskset -c 1 "$BIN" bench pubsub --port "$port" --pubs 16 --subs 16 --qos 1 --size 64 --duration "$secs" \
  --window 64 --persistent --json >"$work/bench.json" 2>/dev/null &
load=$!
echo "| minute | data dir (MiB) | files |"
echo "|---|---|---|"
max=0
for i in $(seq 1 $((mins * 2))); do
  sleep 30
  kb=$(du -sk "$work/data" | cut -f1)
  [ "$kb" -gt "$max" ] && max=$kb
  printf '| %.1f | %.1f | %s |\n' "$(echo "$i / 2" | bc -l)" "$(echo "$kb / 1024" | bc -l)" "$(ls "$work/data/store" | tr '\n' ' ')"
done
wait "$load"
python3 - "$work/bench.json" "$max" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
print(f"\ndelivered {out['received']:,} messages ({out['delivered_per_second']:,.0f}/s), "
      f"lost {out['lost']}, duplicates {out['duplicates']}; "
      f"largest data dir {int(sys.argv[2]) / 1024:.1f} MiB")
PY

#!/usr/bin/env bash
# Starts the release broker on a free loopback port and drives it with outside clients:
# mosquitto_pub/mosquitto_sub (mosquitto_clients.sh) and paho-mqtt (paho_sessions.py).
# Also checks the binary's CLI contract: config errors exit 2 naming file, line and key;
# SIGTERM shuts down gracefully with exit 0. Usage: tests/interop/run.sh [path/to/halyard]
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/halyard}
work=$(mktemp -d)
broker=""
cleanup() {
  [ -n "$broker" ] && kill "$broker" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fails=0

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve --listen "tcp://127.0.0.1:$port" --data-dir "$work/data" >"$work/broker.log" 2>&1 &
broker=$!
for _ in $(seq 1 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
  sleep 0.05
done

bash tests/interop/mosquitto_clients.sh 127.0.0.1 "$port" || fails=$((fails + 1))
python3 tests/interop/paho_sessions.py 127.0.0.1 "$port" || fails=$((fails + 1))

# Graceful shutdown: SIGTERM -> exit 0 within the drain deadline.
kill -TERM "$broker"
rc=0
wait "$broker" || rc=$?
broker=""
if [ "$rc" -eq 0 ] && grep -q "halyard stopped" "$work/broker.log"; then
  echo "ok   SIGTERM: graceful shutdown, exit 0"
else
  echo "FAIL SIGTERM: exit $rc"; tail -5 "$work/broker.log"; fails=$((fails + 1))
fi

# A bad config names the file, line and key, and exits 2.
printf 'max_qos = 1\nmax_keepalive = "soon"\n' >"$work/bad.toml"
out=$("$BIN" serve --config "$work/bad.toml" 2>&1); rc=$?
if [ "$rc" -eq 2 ] && [[ "$out" == *"bad.toml:2: key \`max_keepalive\`"* ]]; then
  echo "ok   bad config: exit 2 naming file, line and key"
else
  echo "FAIL bad config: exit $rc, said: $out"; fails=$((fails + 1))
fi

if [ "$fails" -ne 0 ]; then
  echo "--- broker log (tail) ---"; tail -30 "$work/broker.log"
fi
[ "$fails" -eq 0 ]

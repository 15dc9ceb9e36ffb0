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

source tests/interop/lib.sh

port=$(free_port)
"$BIN" serve --listen "tcp://127.0.0.1:$port" --data-dir "$work/data" >"$work/broker.log" 2>&1 &
broker=$!
wait_port "$port"

bash tests/interop/mosquitto_clients.sh 127.0.0.1 "$port" || fails=$((fails + 1))
python3 tests/interop/paho_sessions.py 127.0.0.1 "$port" || fails=$((fails + 1))
# Acknowledged (QoS 1) retained message: must survive everything below.
mosquitto_pub -h 127.0.0.1 -p "$port" -t durable/check -q 1 -r -m "still here"

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

# A torn write at the end of the store's log: `store check` reports it (exit 1); the broker
# starts, says it cut the tail off, and keeps what was acknowledged before it.
wal=$(ls "$work/data/store"/wal-*.log | tail -n 1)
printf '\x40\x00\x00\x00\xde\xad' >>"$wal"
"$BIN" store check --data-dir "$work/data" >"$work/check.txt"; rc=$?
if [ "$rc" -eq 1 ] && grep -q "bad record" "$work/check.txt"; then
  echo "ok   store check reports the torn tail (exit 1)"
else
  echo "FAIL store check: exit $rc"; cat "$work/check.txt"; fails=$((fails + 1))
fi
"$BIN" serve --listen "tcp://127.0.0.1:$port" --data-dir "$work/data" >"$work/broker2.log" 2>&1 &
broker=$!
wait_port "$port"
got=$(mosquitto_sub -h 127.0.0.1 -p "$port" -t durable/check -C 1 -W 5)
if [ "$got" = "still here" ] && grep -q "cut off" "$work/broker2.log"; then
  echo "ok   damaged log tail cut off and reported; acknowledged data kept"
else
  echo "FAIL after damaged tail: got '$got'"; tail -5 "$work/broker2.log"; fails=$((fails + 1))
fi
kill -TERM "$broker"; wait "$broker"; broker=""
if "$BIN" store check --data-dir "$work/data" >/dev/null; then
  echo "ok   store check clean after recovery"
else
  echo "FAIL store check after recovery"; fails=$((fails + 1))
fi

# A bad config names the file, line and key, and exits 2.
printf 'max_qos = 1\nmax_keepalive = "soon"\n' >"$work/bad.toml"
out=$("$BIN" serve --config "$work/bad.toml" 2>&1); rc=$?
if [ "$rc" -eq 2 ] && [[ "$out" == *"bad.toml:2: key \`max_keepalive\`"* ]]; then
  echo "ok   bad config: exit 2 naming file, line and key"
else
  echo "FAIL bad config: exit $rc, said: $out"; fails=$((fails + 1))
fi

# A listener that cannot be bound names its URL and exits 1; a bad --listen exits 2.
out=$("$BIN" serve --data-dir "$work/d3" --listen "unix:///nonexistent-dir/h.sock" 2>&1); rc=$?
if [ "$rc" -eq 1 ] && [[ "$out" == *"cannot listen on unix:///nonexistent-dir/h.sock"* ]]; then
  echo "ok   unbindable listener: exit 1 naming the URL"
else
  echo "FAIL unbindable listener: exit $rc, said: $out"; fails=$((fails + 1))
fi
out=$("$BIN" serve --listen "tls://0.0.0.0:8883" 2>&1); rc=$?
if [ "$rc" -eq 2 ] && [[ "$out" == *"needs \`certfile\` and \`keyfile\`"* ]]; then
  echo "ok   --listen tls:// without certificate: exit 2 saying what is missing"
else
  echo "FAIL bad --listen: exit $rc, said: $out"; fails=$((fails + 1))
fi

# Every transport with outside clients (TLS, mTLS, unix, ws, wss, rotation).
bash tests/interop/transports.sh "$BIN" || fails=$((fails + 1))
# Password files with mosquitto_passwd, mosquitto_pub and the mosquitto broker.
bash tests/interop/auth.sh "$BIN" || fails=$((fails + 1))

if [ "$fails" -ne 0 ]; then
  echo "--- broker log (tail) ---"; tail -30 "$work/broker.log"
fi
[ "$fails" -eq 0 ]

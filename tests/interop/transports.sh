#!/usr/bin/env bash
# Every transport against outside clients, on one release broker:
#   tls://  mosquitto_pub/sub (OpenSSL), TLS 1.2 and 1.3, MQTT 3.1.1 and 5.0, with a test CA
#           made here by openssl; a listener that requires a client certificate and uses its
#           CN as the user name: refused without one, served with one.
#   unix:// mosquitto_pub/sub --unix; socket file mode; a stale socket file left by kill -9
#           is removed on the next start.
#   ws://, wss://  paho-mqtt (transports_paho.py), 3.1.1 and 5.0, plus HTTP errors.
#   Certificate rotation on SIGHUP: new clients see the new certificate (a new CA), a
#   client connected before stays connected and keeps receiving.
# Usage: tests/interop/transports.sh [path/to/halyard]. Prints ok/FAIL lines; exit 1 on failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/halyard}
work=$(mktemp -d)
broker=""
bg=()
cleanup() {
  [ -n "$broker" ] && kill "$broker" 2>/dev/null
  for p in "${bg[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }

source "$(dirname "$0")/lib.sh"

# --- a test PKI: CA 1 (server + client certificates), CA 2 (the rotated server cert) ---
pki() { openssl "$@" >/dev/null 2>&1; }
mkca() { # name
  pki req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=Halyard test $1" -keyout "$work/$1.key" -out "$work/$1.pem"
}
mkcert() { # name ca subject extension-line
  pki req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$3" \
    -keyout "$work/$1.key" -out "$work/$1.csr"
  local ext=$work/$1.ext
  echo "$4" >"$ext" # any extension makes it X.509 v3; webpki rightly refuses v1
  pki x509 -req -in "$work/$1.csr" -CA "$work/$2.pem" -CAkey "$work/$2.key" -CAcreateserial \
    -days 2 -extfile "$ext" -out "$work/$1.pem"
}
mkca ca1
mkca ca2
mkcert server ca1 "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1"
mkcert server2 ca2 "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1"
mkcert client ca1 "/CN=sensor-7" "extendedKeyUsage=clientAuth"
# The broker reads these paths; rotation replaces their contents.
cp "$work/server.pem" "$work/live.pem"
cp "$work/server.key" "$work/live.key"

P_TCP=$(free_port); P_TLS=$(free_port); P_MTLS=$(free_port); P_WS=$(free_port); P_WSS=$(free_port)
SOCK=$work/halyard.sock
tls_q="certfile=$work/live.pem&keyfile=$work/live.key&tls_reload_interval=0"
start_broker() {
  "$BIN" serve --data-dir "$work/data" \
    --listen "tcp://127.0.0.1:$P_TCP" \
    --listen "tls://127.0.0.1:$P_TLS?$tls_q" \
    --listen "tls://127.0.0.1:$P_MTLS?certfile=$work/server.pem&keyfile=$work/server.key&cafile=$work/ca1.pem&require_certificate=true&use_identity_as_username=true" \
    --listen "ws://127.0.0.1:$P_WS/mqtt" \
    --listen "wss://127.0.0.1:$P_WSS/mqtt?certfile=$work/server.pem&keyfile=$work/server.key" \
    --listen "unix://$SOCK?socket_mode=0660" \
    >>"$work/broker.log" 2>&1 &
  broker=$!
  wait_port "$P_TCP" && wait_port "$P_WSS"
}
start_broker || { echo "FAIL broker did not start"; cat "$work/broker.log"; exit 1; }

# Remember every background subscriber for the cleanup.
sub() { start_sub "$@"; local rc=$?; bg+=("$SUB_PID"); return $rc; }
payload() { payload_lines "$1"; }
TLS1=(-h localhost -p "$P_TLS" --cafile "$work/ca1.pem")

# tls://: subscribe over TLS, publish over plain TCP (one broker, every transport).
for V in mqttv311 mqttv5; do
  for T in tlsv1.2 tlsv1.3; do
    t="tls/$V/$T"
    if sub "$work/s" "${TLS1[@]}" --tls-version "$T" -V "$V" -t "$t" -q 1 -C 1; then
      mosquitto_pub -h 127.0.0.1 -p "$P_TCP" -V "$V" -t "$t" -q 1 -m "over $T"
      wait_exit "$SUB_PID"
      got=$(payload "$work/s")
      [ "$got" = "over $T" ] && ok "tls:// $T $V (mosquitto_sub, CA file)" || bad "tls:// $T $V: got '$got'"
    else
      bad "tls:// $T $V: no SUBACK"; tail -3 "$work/s"
    fi
  done
done
# Publishing over TLS too, QoS 2.
if sub "$work/s" "${TLS1[@]}" -V mqttv5 -t tls/pub -q 2 -C 1; then
  mosquitto_pub "${TLS1[@]}" -V mqttv5 -t tls/pub -q 2 -m "both ends tls"
  wait_exit "$SUB_PID"
  [ "$(payload "$work/s")" = "both ends tls" ] && ok "tls:// QoS 2 publish and subscribe over TLS" || bad "tls:// QoS 2: got '$(payload "$work/s")'"
else
  bad "tls:// QoS 2: no SUBACK"
fi
# A client that does not trust the server's CA fails the handshake.
if mosquitto_pub -h localhost -p "$P_TLS" --cafile "$work/ca2.pem" -t x -m y 2>/dev/null; then
  bad "tls:// client with the wrong CA connected"
else
  ok "tls:// client with the wrong CA is refused by its own verification"
fi

# Client certificates: required on this listener, and the CN becomes the user name.
MTLS=(-h localhost -p "$P_MTLS" --cafile "$work/ca1.pem")
for V in mqttv311 mqttv5; do
  if mosquitto_pub "${MTLS[@]}" -V "$V" -t mtls/x -m y 2>/dev/null; then
    bad "mTLS $V: connected without a client certificate"
  else
    ok "mTLS $V: refused without a client certificate"
  fi
  if sub "$work/s" "${MTLS[@]}" --cert "$work/client.pem" --key "$work/client.key" -V "$V" -t "mtls/$V" -q 1 -C 1; then
    mosquitto_pub -h 127.0.0.1 -p "$P_TCP" -V "$V" -t "mtls/$V" -q 1 -m "cert ok"
    wait_exit "$SUB_PID"
    [ "$(payload "$work/s")" = "cert ok" ] && ok "mTLS $V: served with a client certificate" || bad "mTLS $V: got '$(payload "$work/s")'"
  else
    bad "mTLS $V: no SUBACK with a client certificate"; tail -3 "$work/s"
  fi
done

# unix://
mode=$(stat -c '%a' "$SOCK" 2>/dev/null)
[ "$mode" = "660" ] && ok "unix:// socket file mode 0660" || bad "unix:// socket mode is '$mode'"
for V in mqttv311 mqttv5; do
  if sub "$work/s" --unix "$SOCK" -V "$V" -t "unix/$V" -q 1 -C 1; then
    mosquitto_pub --unix "$SOCK" -V "$V" -t "unix/$V" -q 1 -m "via socket"
    wait_exit "$SUB_PID"
    [ "$(payload "$work/s")" = "via socket" ] && ok "unix:// $V (mosquitto --unix)" || bad "unix:// $V: got '$(payload "$work/s")'"
  else
    bad "unix:// $V: no SUBACK"; tail -3 "$work/s"
  fi
done

# ws:// and wss:// with paho-mqtt, and HTTP errors.
python3 tests/interop/transports_paho.py 127.0.0.1 "$P_WS" "$P_WSS" "$work/ca1.pem" "$P_TCP" && ok "ws:// and wss:// (paho-mqtt, see above)" || bad "ws/wss paho checks"

# Certificate rotation on SIGHUP: an old TLS client stays connected across it.
if sub "$work/old" "${TLS1[@]}" -V mqttv5 -t rot/t -q 1 -C 2; then
  mosquitto_pub -h 127.0.0.1 -p "$P_TCP" -t rot/t -q 1 -m before
  cp "$work/server2.pem" "$work/live.pem"
  cp "$work/server2.key" "$work/live.key"
  kill -HUP "$broker"
  for _ in $(seq 1 100); do grep -q "tls files reloaded" "$work/broker.log" && break; sleep 0.05; done
  if mosquitto_pub -h localhost -p "$P_TLS" --cafile "$work/ca2.pem" -t rot/t -q 1 -m after 2>/dev/null; then
    ok "rotation: a new client sees the new certificate (trusts only CA 2)"
  else
    bad "rotation: new certificate not served"; tail -5 "$work/broker.log"
  fi
  if mosquitto_pub -h localhost -p "$P_TLS" --cafile "$work/ca1.pem" -t x -m y 2>/dev/null; then
    bad "rotation: the old certificate is still served"
  else
    ok "rotation: the old certificate is no longer served"
  fi
  wait_exit "$(echo "$SUB_PID")"
  got=$(payload "$work/old" | tr '\n' ' ')
  [ "$got" = "before after " ] && ok "rotation: the client connected before it stayed connected and received" || bad "rotation: old client got '$got'"
  # A broken key file is refused with a clear log line; the current certificate stays.
  echo "not a key" >"$work/live.key"
  kill -HUP "$broker"
  for _ in $(seq 1 100); do grep -q "tls reload refused" "$work/broker.log" && break; sleep 0.05; done
  if grep -q "tls reload refused.*keyfile" "$work/broker.log" &&
    mosquitto_pub -h localhost -p "$P_TLS" --cafile "$work/ca2.pem" -t x -m y 2>/dev/null; then
    ok "rotation: a bad key file is refused, logged, and the previous certificate kept"
  else
    bad "rotation: bad key handling"; grep -i tls "$work/broker.log" | tail -3
  fi
else
  bad "rotation: no SUBACK"
fi

# kill -9 leaves the socket file behind; the next start removes it and serves again.
kill -KILL "$broker"; wait "$broker" 2>/dev/null; broker=""
[ -S "$SOCK" ] && stale=yes || stale=no
cp "$work/server2.key" "$work/live.key"
start_broker
if [ "$stale" = yes ] && mosquitto_pub --unix "$SOCK" -t x -q 1 -m y; then
  ok "unix:// stale socket file from kill -9 removed on restart"
else
  bad "unix:// restart after kill -9 (stale file left: $stale)"; tail -5 "$work/broker.log"
fi
kill -TERM "$broker"; wait "$broker"; broker=""
[ ! -e "$SOCK" ] && ok "unix:// socket file removed on graceful shutdown" || bad "unix:// socket file left after SIGTERM"

echo "transports: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

#!/usr/bin/env bash
# Drives a running Halyard with Debian's mosquitto_pub / mosquitto_sub (an independent
# implementation) for MQTT 3.1.1 and 5.0: QoS 0/1/2, retained messages, wills and v5 user
# properties. Usage: mosquitto_clients.sh HOST PORT. Prints "N passed, N failed".
set -uo pipefail
HOST=$1
PORT=$2
work=$(mktemp -d)
trap 'rm -rf "$work"; jobs -p | xargs -r kill 2>/dev/null' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }

# Starts mosquitto_sub in the background with debug output and waits (polling, 10 s max)
# until its SUBACK arrived, so a publish cannot race the subscription. Sets $SUB_PID.
start_sub() {
  local out=$1; shift
  # Line-buffered, or the debug lines sit in stdio buffers until exit.
  stdbuf -oL -eL mosquitto_sub -h "$HOST" -p "$PORT" -d "$@" >"$out" 2>&1 &
  SUB_PID=$!
  for _ in $(seq 1 200); do
    grep -q "received SUBACK" "$out" && return 0
    sleep 0.05
  done
  return 1
}

# Waits up to 10 s for a background process to exit; returns its status.
wait_exit() {
  local pid=$1
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid"; return $?; }
    sleep 0.05
  done
  kill "$pid" 2>/dev/null
  return 124
}

# Message lines in mosquitto_sub -d output (its debug lines start with "Client " or
# "Subscribed (mid").
payload_lines() { grep -v -e '^Client ' -e '^Subscribed (mid' "$1" || true; }

for V in mqttv31 mqttv311 mqttv5; do
  # QoS 0, 1, 2 end to end; the format prints the QoS the subscriber received.
  for Q in 0 1 2; do
    t="it/$V/qos$Q"
    if start_sub "$work/s" -V "$V" -t "$t" -q "$Q" -C 1 -F '%q %p'; then
      mosquitto_pub -h "$HOST" -p "$PORT" -V "$V" -t "$t" -q "$Q" -m "hello-$Q"
      wait_exit "$SUB_PID"
      got=$(payload_lines "$work/s")
      [ "$got" = "$Q hello-$Q" ] && ok "$V QoS $Q delivered" || bad "$V QoS $Q: got '$got'"
    else
      bad "$V QoS $Q: no SUBACK"
    fi
  done

  # Retained: set, delivered to a later subscriber with the retain flag; then cleared.
  t="it/$V/retained"
  mosquitto_pub -h "$HOST" -p "$PORT" -V "$V" -t "$t" -q 1 -r -m "kept"
  got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V "$V" -t "$t" -C 1 -W 5 -F '%r %p')
  [ "$got" = "1 kept" ] && ok "$V retained delivered on subscribe" || bad "$V retained: got '$got'"
  mosquitto_pub -h "$HOST" -p "$PORT" -V "$V" -t "$t" -q 1 -r -n
  got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V "$V" -t "$t" -C 1 -W 1 -F '%p' 2>/dev/null; echo "rc=$?")
  [ "$got" = "rc=27" ] && ok "$V retained cleared by empty payload" || bad "$V retained clear: got '$got'"

  # Will: a client with a will dies without DISCONNECT (SIGKILL); the watcher gets it.
  t="it/$V/will"
  if start_sub "$work/w" -V "$V" -t "$t" -q 1 -C 1; then
    watcher=$SUB_PID
    start_sub "$work/d" -V "$V" -t "it/$V/nothing" --will-topic "$t" --will-payload "gone" --will-qos 1 -k 60
    dying=$SUB_PID
    kill -9 "$dying"
    wait "$dying" 2>/dev/null
    wait_exit "$watcher"
    got=$(payload_lines "$work/w")
    [ "$got" = "gone" ] && ok "$V will published on abnormal close" || bad "$V will: got '$got'"
  else
    bad "$V will: no SUBACK"
  fi
done

# MQTT 5 user properties, content type and response topic are forwarded.
t="it/v5/props"
if start_sub "$work/p" -V mqttv5 -t "$t" -C 1 -F '%P|%C|%R|%p'; then
  mosquitto_pub -h "$HOST" -p "$PORT" -V mqttv5 -t "$t" -m body \
    -D publish user-property trace abc -D publish content-type text/plain \
    -D publish response-topic reply/1
  wait_exit "$SUB_PID"
  got=$(payload_lines "$work/p")
  [ "$got" = "trace:abc|text/plain|reply/1|body" ] && ok "v5 properties forwarded" || bad "v5 properties: got '$got'"
else
  bad "v5 properties: no SUBACK"
fi

echo "mosquitto-clients: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

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

source "$(dirname "$0")/lib.sh"
# mosquitto_sub against HOST PORT.
sub_at() { local out=$1; shift; start_sub "$out" -h "$HOST" -p "$PORT" "$@"; }

for V in mqttv31 mqttv311 mqttv5; do
  # QoS 0, 1, 2 end to end; the format prints the QoS the subscriber received.
  for Q in 0 1 2; do
    t="it/$V/qos$Q"
    if sub_at "$work/s" -V "$V" -t "$t" -q "$Q" -C 1 -F '%q %p'; then
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
  if sub_at "$work/w" -V "$V" -t "$t" -q 1 -C 1; then
    watcher=$SUB_PID
    sub_at "$work/d" -V "$V" -t "it/$V/nothing" --will-topic "$t" --will-payload "gone" --will-qos 1 -k 60
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
if sub_at "$work/p" -V mqttv5 -t "$t" -C 1 -F '%P|%C|%R|%p'; then
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

#!/usr/bin/env bash
# Password files across implementations, MQTT 3.1.1 and 5.0:
#   a file written by Debian's mosquitto_passwd ($7$) is read by Halyard;
#   a file written by `halyard passwd` (argon2id, and -H sha512-pbkdf2) is read by Halyard,
#   and its $7$ entries by the real mosquitto broker;
#   mosquitto_pub with good / bad / no credentials gets in / 0x86 (rc 4) / 0x87 (rc 5);
#   SIGHUP reloads the file; a broken file is refused and the old one kept;
#   `halyard passwd -D` and `-U` as mosquitto_passwd's.
# Usage: tests/interop/auth.sh [path/to/halyard]. Prints ok/FAIL lines; exit 1 on failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tests/interop/lib.sh
BIN=${1:-target/release/halyard}
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$work"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }

pw=$work/passwd
mosquitto_passwd -c -b "$pw" mosq-user mosq-pass
grep -q '^mosq-user:\$7\$' "$pw" && ok "mosquitto_passwd wrote a \$7\$ entry" || bad "mosquitto_passwd output: $(cat "$pw")"
"$BIN" passwd -b "$pw" hal-user hal-pass || bad "halyard passwd -b"
grep -q '^hal-user:\$argon2id\$' "$pw" && ok "halyard passwd wrote argon2id next to it" || bad "halyard passwd output: $(cat "$pw")"

cat >"$work/acl" <<'ACL'
# mosq-user and late-user may do anything under auth/; hal-user only read it.
user mosq-user
topic readwrite auth/#
user hal-user
topic read auth/#
topic deny auth/private
user late-user
topic readwrite auth/#
ACL
port=$(free_port)
cat >"$work/h.toml" <<TOML
listen = ["tcp://127.0.0.1:$port"]
data_dir = "$work/data"
password_file = "$pw"
acl_file = "$work/acl"
max_client_id_length = 32
max_subscriptions_per_client = 2
max_topic_levels = 8
TOML
"$BIN" serve --config "$work/h.toml" >"$work/broker.log" 2>&1 &
broker=$!
pids+=("$broker")
wait_port "$port" || { cat "$work/broker.log"; exit 1; }

pub() { mosquitto_pub -h 127.0.0.1 -p "$port" -t auth/t -m x "$@" 2>&1; }
pubt() { mosquitto_pub -h 127.0.0.1 -p "$port" "$@" 2>&1; }
for V in mqttv311 mqttv5; do
  pub -V "$V" -u mosq-user -P mosq-pass >/dev/null && ok "$V mosquitto_passwd user gets in" || bad "$V mosq-user refused"
  pub -V "$V" -u hal-user -P hal-pass >/dev/null && ok "$V halyard passwd user gets in" || bad "$V hal-user refused"
  out=$(pub -V "$V" -u hal-user -P wrong); rc=$?
  [ $rc -ne 0 ] && [[ "${out,,}" == *"bad user name or password"* ]] && ok "$V wrong password refused: $out" || bad "$V wrong password: rc $rc, $out"
  out=$(pub -V "$V"); rc=$?
  [ $rc -ne 0 ] && [[ "${out,,}" == *"not authori"* ]] && ok "$V anonymous refused once a password file is set: $out" || bad "$V anonymous: rc $rc, $out"
done
grep -q "refused CONNECT.*peer=127.0.0.1" "$work/broker.log" && ok "failed logins logged with the client address" || bad "no log line for failed logins"

# ACL: hal-user reads auth/# but not auth/private, and may not publish; v5 is told 0x87.
for V in mqttv311 mqttv5; do
  if start_sub "$work/acl_sub" -h 127.0.0.1 -p "$port" -V "$V" -u hal-user -P hal-pass -t 'auth/#' -q 1 -C 1 -W 5; then
    pids+=("$SUB_PID")
    pubt -V "$V" -q 1 -u mosq-user -P mosq-pass -t auth/private -m hidden >/dev/null
    pubt -V "$V" -q 1 -u mosq-user -P mosq-pass -t auth/open -m shown >/dev/null
    wait_exit "$SUB_PID"
    got=$(payload_lines "$work/acl_sub")
    [ "$got" = "shown" ] && ok "$V ACL: read rights filter deliveries (deny rule inside a granted filter)" || bad "$V ACL read: got '$got'"
  else
    bad "$V ACL: hal-user could not subscribe to auth/#"; tail -3 "$work/acl_sub"
  fi
  out=$(mosquitto_sub -h 127.0.0.1 -p "$port" -V "$V" -u hal-user -P hal-pass -t 'other/#' -C 1 -W 3 2>&1); rc=$?
  [[ "$out" == *"subscription requests were denied"* ]] && ok "$V ACL: subscription outside the grant refused (mosquitto_sub: ${out//$'\n'/ })" || bad "$V ACL subscribe: rc $rc $out"
done
out=$(pubt -V mqttv5 -q 1 -u hal-user -P hal-pass -t auth/x -m y -d)
[[ "${out,,}" == *"not authori"* ]] && ok "mqttv5 ACL: publish without write right gets PUBACK 0x87" || bad "v5 publish denied: $out"

# Limits, seen by mosquitto clients.
long_id=$(printf 'x%.0s' $(seq 1 40))
for V in mqttv311 mqttv5; do
  out=$(pubt -V "$V" -i "$long_id" -u mosq-user -P mosq-pass -t auth/x -m y); rc=$?
  [ $rc -ne 0 ] && [[ "${out,,}" == *"identifier"* ]] && ok "$V client id over max_client_id_length refused: ${out%%$'\n'*}" || bad "$V long client id: rc $rc $out"
done
out=$(pubt -V mqttv5 -q 1 -u mosq-user -P mosq-pass -t auth/1/2/3/4/5/6/7/8 -m y -d)
[[ "${out,,}" == *"topic name invalid"* ]] && ok "mqttv5 topic over max_topic_levels: PUBACK 0x90 ($(grep -i 'topic name' <<<"$out" | head -1))" || bad "v5 topic levels: $out"
out=$(mosquitto_sub -h 127.0.0.1 -p "$port" -V mqttv5 -u mosq-user -P mosq-pass -t auth/a -t auth/b -t auth/c -C 1 -W 2 -d 2>&1)
[[ "$out" == *"Subscribed (mid: 1): 0, 0, 151"* ]] && ok "mqttv5 third subscription over max_subscriptions_per_client: SUBACK 0, 0, 151 (0x97)" || bad "v5 subscription quota: $out"

# Reload: a new user on SIGHUP; then a broken file is refused and the old one kept.
"$BIN" passwd -b "$pw" late-user late-pass
kill -HUP "$broker"
for _ in $(seq 1 100); do pub -u late-user -P late-pass >/dev/null && break; sleep 0.05; done
pub -u late-user -P late-pass >/dev/null && ok "SIGHUP: a user added to the file gets in" || bad "SIGHUP reload"
cp "$pw" "$work/good"
broken_line=$(($(wc -l <"$pw") + 1))
echo "broken line without a colon" >>"$pw"
kill -HUP "$broker"
for _ in $(seq 1 100); do grep -q "security files refused" "$work/broker.log" && break; sleep 0.05; done
if grep -q "security files refused.*passwd:$broken_line: expected" "$work/broker.log" && pub -u late-user -P late-pass >/dev/null; then
  ok "SIGHUP with a broken file: refused naming file and line, previous file kept"
else
  bad "broken file on reload"; grep -i "password" "$work/broker.log" | tail -2
fi
cp "$work/good" "$pw"
# A change to the file is picked up without a signal (checked every 5 s).
"$BIN" passwd -b "$pw" watched-user watched-pass
for _ in $(seq 1 160); do pub -u watched-user -P watched-pass >/dev/null && break; sleep 0.05; done
pub -u watched-user -P watched-pass >/dev/null && ok "file change: a user added without SIGHUP gets in" || bad "file watch reload"
# paho-mqtt (another independent client), 3.1.1 and 5.0.
python3 - "$port" <<'PY' && ok "paho-mqtt: good password in, wrong password 0x86/rc 4, for 3.1.1 and 5.0" || bad "paho-mqtt auth"
import sys, threading
import paho.mqtt.client as mqtt
port = int(sys.argv[1])
def attempt(proto, pw):
    done, rc = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
    c.username_pw_set("hal-user", pw)
    c.on_connect = lambda cl, u, f, reason, p: (rc.append(reason), done.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(5)
    c.loop_stop()
    return rc[0] if rc else None
for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
    assert attempt(proto, "hal-pass") == 0, "good password refused"
    r = attempt(proto, "nope")
    assert r is not None and r.value in (4, 0x86), f"wrong password: {r}"
PY
"$BIN" passwd -D "$pw" late-user && ! grep -q '^late-user:' "$pw" && ok "halyard passwd -D deletes" || bad "passwd -D"
"$BIN" passwd -D "$pw" nobody 2>/dev/null && bad "passwd -D of a missing user succeeded" || ok "passwd -D of a missing user fails"
printf 'u1:p1\nu2:p2\n' >"$work/plain"
"$BIN" passwd -U "$work/plain" && grep -q '^u2:\$argon2id\$' "$work/plain" && ok "halyard passwd -U hashes a plain-text file" || bad "passwd -U"
"$BIN" passwd -U "$work/plain" 2>/dev/null && bad "-U twice accepted" || ok "-U refuses an already hashed file"

# SCRAM (MQTT 5 AUTH) with an independent client implementation (Python scramp).
"$BIN" passwd -b -H scram-sha-256 "$pw" alice pencil
"$BIN" passwd -b -H scram-sha-512 "$pw" bob builder
kill -HUP "$broker"
for _ in $(seq 1 100); do pub -u alice -P pencil >/dev/null && break; sleep 0.05; done
python3 tests/interop/scram_mqtt.py 127.0.0.1 "$port" && ok "SCRAM-SHA-256/512 exchange with scramp (see above)" || bad "SCRAM with scramp"

# The real mosquitto broker reads what `halyard passwd -H sha512-pbkdf2` writes.
"$BIN" passwd -c -b -H sha512-pbkdf2 -I 101 "$work/forward" fwd-user fwd-pass
mport=$(free_port)
# `user root`: as root, mosquitto would otherwise switch to its own user, which cannot
# read a 0600 file in a 0700 temporary directory.
printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous false\npassword_file %s\n' "$mport" "$work/forward" >"$work/m.conf"
mosquitto -c "$work/m.conf" >"$work/mosq.log" 2>&1 &
pids+=("$!")
wait_port "$mport"
if mosquitto_pub -h 127.0.0.1 -p "$mport" -t t -m x -u fwd-user -P fwd-pass &&
  ! mosquitto_pub -h 127.0.0.1 -p "$mport" -t t -m x -u fwd-user -P nope 2>/dev/null; then
  ok "mosquitto 2.0 accepts halyard passwd's \$7\$ entry and rejects a wrong password"
else
  bad "mosquitto with halyard's file"; tail -3 "$work/mosq.log"
fi

echo "auth: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

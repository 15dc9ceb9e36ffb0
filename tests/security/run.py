#!/usr/bin/env python3
"""The security review's attacks, replayed against the release binary with clients we did
not write: Eclipse Paho (Python), mosquitto_pub/mosquitto_sub, mosquitto_passwd for the
password file, raw sockets for the PROXY header (a source address other than loopback).
MQTT 3.1.1 and 5.0 wherever the behaviour exists in both.

Usage: python3 tests/security/run.py [path/to/halyard]. Prints one line per check and
"N passed, N failed"; exits 1 on any failure. Brokers bind free loopback ports, wait on
events with timeouts (never a fixed sleep), and are stopped by PID at the end.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import compare  # noqa: E402  free_port, wait_port

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/halyard")
WAIT = 5.0
passed = failed = 0
procs = []


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def serve(work, config):
    """Starts `halyard serve` with `config` (TOML) in `work`; returns (mqtt, proxied, admin) ports."""
    mqtt_port, proxied, admin = compare.free_port(), compare.free_port(), compare.free_port()
    path = os.path.join(work, "halyard.toml")
    with open(path, "w") as f:
        f.write(f'listen = ["tcp://127.0.0.1:{mqtt_port}", "tcp://127.0.0.1:{proxied}?proxy_protocol=true"]\n')
        f.write(f'data_dir = "{work}/data"\n{config}\n[admin]\nlisten = "http://127.0.0.1:{admin}"\n')
    log = open(os.path.join(work, "broker.log"), "w")
    p = subprocess.Popen([BIN, "serve", "--config", path], stdout=log, stderr=subprocess.STDOUT)
    procs.append(p)
    compare.wait_port(mqtt_port, p, "halyard")
    compare.wait_port(admin, p, "halyard admin")
    return mqtt_port, proxied, admin


def raw_connect(port, version, user=None, password=None, proxy_from=None):
    """CONNECT written by hand (clean session, keep alive 30); returns the CONNACK's code."""
    s = socket.create_connection(("127.0.0.1", port), WAIT)
    s.settimeout(WAIT)
    if proxy_from:
        s.sendall(f"PROXY TCP4 {proxy_from} 127.0.0.1 40000 1883\r\n".encode())

    def string(b):
        return len(b).to_bytes(2, "big") + b

    flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
    body = string(b"MQTT") + bytes([5 if version == 5 else 4, flags]) + (30).to_bytes(2, "big")
    if version == 5:
        body += b"\x00"  # no properties
    body += string(b"sec-raw")
    if user:
        body += string(user.encode())
    if password:
        body += string(password.encode())
    s.sendall(bytes([0x10, len(body)]) + body)
    head = s.recv(2)
    rest = s.recv(head[1]) if len(head) == 2 else b""
    s.close()
    return rest[1] if len(rest) >= 2 else None


class Paho:
    def __init__(self, port, cid, version, user=None, password=None, clean=True, will=None):
        self.v5 = version == 5
        self.msgs = []
        self.got = threading.Condition()
        self.connack = threading.Event()
        self.code = None
        self.session_present = None
        self.acks = {}
        proto = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        kw = {} if self.v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, **kw)
        if user:
            self.c.username_pw_set(user, password)
        if will:
            self.c.will_set(will, b"spoofed", qos=1, retain=True)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc)
        self.c.on_connect_fail = lambda c, u: self.connack.set()
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if clean else 3600
        self.c.connect("127.0.0.1", port, 30, clean_start=clean if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        self.c.loop_start()
        self.connack.wait(WAIT)

    def _on_connect(self, c, u, flags, rc, props):
        self.code = rc.value if hasattr(rc, "value") else int(rc)
        self.session_present = flags.session_present
        self.connack.set()

    def _on_message(self, c, u, m):
        with self.got:
            self.msgs.append((m.topic, m.payload))
            self.got.notify_all()

    def wait_msg(self, pred, timeout=WAIT):
        end = time.time() + timeout
        with self.got:
            while not any(pred(t, p) for t, p in self.msgs):
                left = end - time.time()
                if left <= 0:
                    return False
                self.got.wait(left)
        return True

    def sub(self, topic):
        r, mid = self.c.subscribe(topic, 1)
        return r == 0

    def close(self):
        self.c.loop_stop()
        try:
            self.c.socket() and self.c.socket().close()
        except OSError:
            pass


NOT_AUTHORIZED = {4: 5, 5: 0x87}  # CONNACK return code / reason code, on the wire
PAHO_NOT_AUTHORIZED = 0x87  # paho reports 3.1.1's return code 5 as 0x87 too


def attack_unverified_user_names(work):
    """No password file: a user name is no identity. From 203.0.113.7 (PROXY header) every
    client is anonymous, and anonymous clients are loopback-only by default."""
    _, proxied, _ = serve(work, "")
    for v in (4, 5):
        for user in (None, "x", "admin"):
            code = raw_connect(proxied, v, user, "anything" if user else None, "203.0.113.7")
            check(f"v{v} user {user!r} from 203.0.113.7 without a password file refused",
                  code == NOT_AUTHORIZED[v], f"CONNACK {code}")


def attacks_with_users(work):
    pw = os.path.join(work, "passwd")
    open(pw, "w").close()
    for user, secret in (("alice", "alice-pw"), ("bob", "bob-pw")):
        subprocess.run(["mosquitto_passwd", "-b", pw, user, secret], check=True)
    acl = os.path.join(work, "acl")
    with open(acl, "w") as f:
        f.write("pattern readwrite $SYS/#\nuser alice\ntopic readwrite alice/#\nuser bob\ntopic readwrite bob/#\n")
    port, _, admin = serve(work, f'password_file = "{pw}"\nacl_file = "{acl}"\n'
                                 "max_user_properties = 16\n")
    for v in (4, 5):
        # Wills are PUBLISHes: bob may not leave one on alice's topic.
        b = Paho(port, f"bob-will-{v}", v, "bob", "bob-pw", will="alice/will")
        check(f"v{v} paho: bob's will on alice/will refused at CONNECT",
              b.code == PAHO_NOT_AUTHORIZED, f"CONNACK {b.code}")
        b.close()
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5" if v == 5 else "mqttv311",
                            "-u", "bob", "-P", "bob-pw", "--will-topic", "alice/will", "--will-payload", "x",
                            "-t", "bob/x", "-m", "hi"], capture_output=True, text=True, timeout=WAIT * 2)
        check(f"v{v} mosquitto_pub: bob's will on alice/will refused", r.returncode != 0 and "authori" in
              (r.stderr + r.stdout).lower(), f"exit {r.returncode}: {r.stderr.strip()}")
        # One user's session is not another's.
        a = Paho(port, f"alice-2-{v}", v, "alice", "alice-pw", clean=False)
        a.sub("alice/#")
        bob = Paho(port, f"alice-2-{v}", v, "bob", "bob-pw", clean=False)
        check(f"v{v} bob naming alice's client id refused", bob.code == PAHO_NOT_AUTHORIZED and not bob.session_present,
              f"CONNACK {bob.code}, session present {bob.session_present}")
        bob.close()
        p = Paho(port, f"alice-pub-{v}", v, "alice", "alice-pw")
        p.c.publish("alice/secret/1", b"for alice", 1)
        check(f"v{v} alice still connected and served after bob's attempt",
              a.wait_msg(lambda t, m: t == "alice/secret/1"))
        a.close()
        p.close()
    # $SYS is the broker's: a retained spoof is refused (no ACL entry could allow it).
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-u", "alice", "-P", "alice-pw",
                    "-t", "$SYS/broker/version", "-r", "-q", "1", "-m", "spoofed"], capture_output=True, timeout=WAIT * 2)
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", "alice", "-P", "alice-pw",
                        "-t", "$SYS/broker/version", "-C", "1", "-W", "5"], capture_output=True, text=True,
                       timeout=WAIT * 2)
    check("$SYS/broker/version not spoofed by a client", "spoofed" not in r.stdout and "halyard" in r.stdout.lower(),
          repr(r.stdout))
    # v5 user properties beyond the limit: PUBACK 0x97, nothing routed.
    a = Paho(port, "alice-props", 5, "alice", "alice-pw")
    a.sub("alice/#")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(f"k{i}", "v") for i in range(17)]
    info = a.c.publish("alice/props", b"x", 1, properties=props)
    info.wait_for_publish(WAIT)
    code = a.acks.get(info.mid)
    check("v5 PUBLISH over max_user_properties gets PUBACK 0x97",
          code is not None and int(getattr(code, "value", code)) == 0x97, f"reason {code}")
    check("v5 the refused message is not delivered", not a.wait_msg(lambda t, m: t == "alice/props", 0.5))
    a.close()
    # CSRF: what an HTML form on another site can send changes nothing.
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/api/v1/publish", method="POST",
                                 data=b'{"topic":"ha/test","payload":"x","retain":true}',
                                 headers={"Content-Type": "text/plain", "Authorization": "Basic eDp5"})
    try:
        urllib.request.urlopen(req, timeout=WAIT)
        status, head = 200, {}
    except urllib.error.HTTPError as e:
        status, head = e.code, dict(e.headers)
    check("admin API: a text/plain POST is refused (415) before credentials are read", status == 415, str(status))
    check("admin API: no WWW-Authenticate (no browser credential prompt)",
          not any(k.lower() == "www-authenticate" for k in head), str(head))


def attack_session_flood(work):
    """One user making sessions in numbers."""
    pw = os.path.join(work, "passwd")
    open(pw, "w").close()
    subprocess.run(["mosquitto_passwd", "-b", pw, "carol", "carol-pw"], check=True)
    port, _, _ = serve(work, f'password_file = "{pw}"\nmax_sessions_per_user = 2\n')
    # Sessions per user are bounded (max_sessions_per_user = 2): carol's third and fourth
    # persistent sessions are refused, 0x97 in v5 and return code 3 in 3.1.1 (paho reports
    # it as 0x88); resuming one of hers is not.
    held = [Paho(port, "carol-1", 5, "carol", "carol-pw", clean=False),
            Paho(port, "carol-2", 4, "carol", "carol-pw", clean=False)]
    check("carol's first two sessions accepted", [c.code for c in held] == [0, 0], str([c.code for c in held]))
    c3 = Paho(port, "carol-3", 5, "carol", "carol-pw", clean=False)
    check("v5 carol's third session refused with 0x97 (max_sessions_per_user)", c3.code == 0x97, f"CONNACK {c3.code}")
    c4 = Paho(port, "carol-4", 4, "carol", "carol-pw", clean=False)
    check("v4 carol's third session refused with return code 3", c4.code == 0x88, f"CONNACK {c4.code}")
    for c in held + [c3, c4]:
        c.close()
    again = Paho(port, "carol-1", 5, "carol", "carol-pw", clean=False)
    check("v5 carol resumes a session she holds", again.code == 0 and again.session_present,
          f"CONNACK {again.code}, session present {again.session_present}")
    again.close()


def main():
    if not os.path.exists(BIN):
        sys.exit(f"no broker binary at {BIN}")
    for tool in ("mosquitto_pub", "mosquitto_sub", "mosquitto_passwd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: install mosquitto-clients and mosquitto (see .ci/run)")
    try:
        for attack in (attack_unverified_user_names, attacks_with_users, attack_session_flood):
            work = tempfile.mkdtemp(prefix="halyard-sec-")
            try:
                attack(work)
            except Exception as e:  # a crash of the harness is a failure, never a pass
                check(attack.__name__, False, repr(e))
            finally:
                for p in procs:
                    p.terminate()
                    try:
                        p.wait(WAIT)
                    except subprocess.TimeoutExpired:
                        p.kill()
                procs.clear()
                shutil.rmtree(work, ignore_errors=True)
    finally:
        for p in procs:
            p.kill()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()

"""Persistent sessions and shared subscriptions against a running Halyard, with the
Eclipse Paho Python client (an independent implementation), for MQTT 3.1.1 and 5.0.

Usage: python3 paho_sessions.py HOST PORT. Prints "N passed, N failed"; exit 1 on failure.
Every wait is on an acknowledgement or message event with a timeout, never a fixed sleep.
"""

import queue
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST, PORT = sys.argv[1], int(sys.argv[2])
WAIT = 5.0
passed = failed = 0


class Client:
    def __init__(self, cid, proto, clean=True, expiry=None):
        self.msgs = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present = None
        self.v5 = proto == mqtt.MQTTv5
        kwargs = {} if self.v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, **kwargs)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            self.c.connect(HOST, PORT, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect(HOST, PORT, keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(WAIT):
            raise RuntimeError(f"{cid}: no CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.session_present = flags.session_present
        self.connected.set()

    def sub(self, topic, qos):
        self.subscribed.clear()
        self.c.subscribe(topic, qos)
        if not self.subscribed.wait(WAIT):
            raise RuntimeError(f"no SUBACK for {topic}")

    def pub(self, topic, payload, qos):
        info = self.c.publish(topic, payload, qos)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise RuntimeError("publish not acknowledged")

    def get(self, timeout=WAIT):
        return self.msgs.get(timeout=timeout)

    def nothing_more(self, timeout=0.3):
        try:
            self.msgs.get(timeout=timeout)
            return False
        except queue.Empty:
            return True

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and keep going
        failed += 1
        print(f"FAIL {name}: {e!r}")


def persistent_session(proto, label):
    def run():
        expiry = 300 if proto == mqtt.MQTTv5 else None
        sid = f"paho-persist-{label}"
        s = Client(sid, proto, clean=False, expiry=expiry)
        s.sub(f"ps/{label}/#", 1)
        s.close()
        p = Client(f"paho-pub-{label}", proto)
        for i in range(5):
            p.pub(f"ps/{label}/x", f"m{i}", 1)
        p.close()
        s = Client(sid, proto, clean=False, expiry=expiry)
        assert s.session_present, "session present after reconnect [MQTT-3.2.2-2]"
        got = [s.get().payload.decode() for _ in range(5)]
        assert got == [f"m{i}" for i in range(5)], got
        assert s.nothing_more()
        s.close()
        # A clean start discards the session [MQTT-3.1.2-4].
        s = Client(sid, proto, clean=True, expiry=expiry)
        assert not s.session_present
        s.close()

    return run


def session_expiry_zero_v5():
    s = Client("paho-noexpiry", mqtt.MQTTv5, clean=False, expiry=0)
    s.sub("ne/#", 1)
    s.close()
    s = Client("paho-noexpiry", mqtt.MQTTv5, clean=False, expiry=0)
    assert not s.session_present, "expiry 0 ends the session at disconnect [MQTT-3.1.2-11]"
    s.close()


def shared_subscription(proto, label):
    def run():
        a = Client(f"paho-sh-a-{label}", proto)
        b = Client(f"paho-sh-b-{label}", proto)
        for c in (a, b):
            c.sub(f"$share/grp/sh/{label}", 1)
        p = Client(f"paho-sh-pub-{label}", proto)
        for i in range(10):
            p.pub(f"sh/{label}", str(i), 1)
        got_a = [a.get().payload.decode() for _ in range(5)]
        got_b = [b.get().payload.decode() for _ in range(5)]
        assert a.nothing_more() and b.nothing_more(), "each message to one member only"
        assert sorted(got_a + got_b, key=int) == [str(i) for i in range(10)], (got_a, got_b)
        for c in (a, b, p):
            c.close()

    return run


check("3.1.1 persistent session keeps subscriptions and queues QoS 1", persistent_session(mqtt.MQTTv311, "311"))
check("5.0 persistent session (expiry 300) keeps subscriptions and queues QoS 1", persistent_session(mqtt.MQTTv5, "5"))
check("5.0 session expiry 0 ends the session at disconnect", session_expiry_zero_v5)
check("3.1.1 shared subscription splits messages between members", shared_subscription(mqtt.MQTTv311, "311"))
check("5.0 shared subscription splits messages between members", shared_subscription(mqtt.MQTTv5, "5"))
print(f"paho: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)

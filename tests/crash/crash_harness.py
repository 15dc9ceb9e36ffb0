"""Crash harness: SIGKILL the broker at random moments while publishers send QoS 1 and
QoS 2 messages to persistent sessions that are offline; restart it each time; then drain.

Every message whose PUBACK (QoS 1) or PUBCOMP (QoS 2) the publisher received must be
delivered: QoS 1 at least once, QoS 2 exactly once. Publishers use persistent sessions so
that their unacknowledged messages are resent after each restart (with DUP).

Usage: python3 crash_harness.py BINARY KILLS [SEED] [RATE]
RATE caps each publisher at that many messages per second (default: as fast as it can). Long
runs use it: with offline subscribers the backlog, and so each restart's recovery, grows with
every message published.
Prints a summary and "N passed, N failed"; exit 1 on any loss or QoS 2 duplicate.
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens in CI logs
BIN, KILLS = sys.argv[1], int(sys.argv[2])
SEED = int(sys.argv[3]) if len(sys.argv) > 3 else int(time.time())
RATE = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
rng = random.Random(SEED)
work = tempfile.mkdtemp(prefix="halyard-crash-")


def pick_port():
    """A free port below the ephemeral range. While the broker is down between a kill and
    its restart, its port is free; a port the kernel hands out for `bind(0)` could then be
    taken by another program's listener (a test suite's broker, seen once) or by a client
    socket, and the publishers would talk to that instead."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(10000, max(10001, low))  # not `rng`: kill times stay per seed
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port below the ephemeral range")


PORT = pick_port()
config = os.path.join(work, "halyard.toml")
with open(config, "w") as f:
    f.write(
        f'listen = ["tcp://127.0.0.1:{PORT}"]\n'
        f'data_dir = "{work}/data"\n'
        "max_queued_messages = 10000000\nmax_queued_bytes = 0\nmax_inflight_messages = 100\n"
        # Not needed here, and its fixed port would clash with anything else running.
        "[admin]\nenabled = false\n"
    )
log = open(os.path.join(work, "broker.log"), "ab")
broker = None
# Set while the broker accepts connections; publishers reconnect only then (see Publisher).
broker_up = threading.Event()


def start():
    global broker
    broker = subprocess.Popen([BIN, "serve", "--config", config], stdout=log, stderr=log)
    # Recovery time grows with the backlog (millions of queued deliveries take seconds).
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            probe = socket.create_connection(("127.0.0.1", PORT), 0.2)
        except OSError:
            time.sleep(0.02)
            continue
        # PORT is in the ephemeral range: a probe can connect to itself (TCP simultaneous
        # open) while nothing listens. That looked like a running broker, and the socket
        # then kept the broker from binding its port (seen once in a 200-kill run).
        self_connected = probe.getsockname() == probe.getpeername()
        probe.close()
        if self_connected:
            time.sleep(0.02)
            continue
        broker_up.set()
        return
    raise RuntimeError("broker did not start")


def kill():
    broker_up.clear()
    broker.send_signal(signal.SIGKILL)
    broker.wait()


def connect_props(expiry):
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = expiry
    return p


SUBSCRIBERS = [("crash-sub-q1", 1), ("crash-sub-q2", 2)]


def subscribe_offline():
    for cid, qos in SUBSCRIBERS:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        done = threading.Event()
        c.on_subscribe = lambda *a, done=done: done.set()
        c.connect("127.0.0.1", PORT, clean_start=True, properties=connect_props(3600))
        c.loop_start()
        c.subscribe("crash/#", qos)
        assert done.wait(10), "SUBACK"
        c.disconnect()
        c.loop_stop()


class Publisher:
    """Publishes numbered messages; records the ones acknowledged (PUBACK / PUBCOMP)."""

    def __init__(self, idx, qos):
        self.idx, self.qos = idx, qos
        self.acked = set()
        self.mids = {}
        self.early = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"crash-pub-{idx}", protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(20)
        self.c.on_publish = self.on_publish
        self.c.connect("127.0.0.1", PORT, clean_start=False, properties=connect_props(3600))
        self.closing = False
        # We run paho's network loop ourselves instead of loop_start(): paho-mqtt resets
        # its QoS 2 state on every reconnect *attempt*, so after a failed attempt a message
        # whose PUBREL was already sent is reset to PUBLISH and sent again, a client
        # violation of [MQTT-4.3.3-7] that the broker must treat as a new message (a
        # duplicate downstream). Reconnecting only once the broker is known to be up means
        # attempts do not fail (kills are at least 2.5 s after a start).
        self.net = threading.Thread(target=self.network, daemon=True)
        self.net.start()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def network(self):
        while not self.closing:
            if self.c.loop(timeout=0.05) == mqtt.MQTT_ERR_SUCCESS:
                continue
            if self.closing:
                break
            broker_up.wait()
            try:
                self.c.reconnect()
            except OSError:
                time.sleep(0.05)

    def on_publish(self, client, userdata, mid, reason_code, properties):
        # Runs on paho's network thread, possibly before publish() returned the mid.
        with self.lock:
            ok = not reason_code.is_failure
            payload = self.mids.pop(mid, None)
            if payload is None:
                self.early[mid] = ok
            elif ok:
                self.acked.add(payload)

    def run(self):
        n = 0
        t0 = time.time()
        while not self.stop.is_set():
            if RATE > 0 and n > (time.time() - t0) * RATE:
                time.sleep(0.002)
                continue
            with self.lock:
                backlog = len(self.mids)
            # paho-mqtt re-sends *every* unacknowledged message right after a reconnect,
            # ignoring its in-flight window (the increment is commented out in
            # Client._messages_reconnect_reset_out). Keeping the backlog under the broker's
            # Receive Maximum (100 below) keeps that burst legal [MQTT-3.3.4-9].
            if backlog >= 80:
                time.sleep(0.005)
                continue
            payload = f"p{self.idx}-q{self.qos}-{n}"
            # Never call into paho while holding our lock: paho holds its own lock when it
            # calls on_publish, which takes ours.
            info = self.c.publish(f"crash/{self.idx}", payload, self.qos)
            with self.lock:
                early = self.early.pop(info.mid, None)
                if early is None:
                    self.mids[info.mid] = payload
                elif early:
                    self.acked.add(payload)
            n += 1
        self.sent = n

    def finish(self, wait):
        self.stop.set()
        self.t.join()
        deadline = time.time() + wait
        while time.time() < deadline:
            with self.lock:
                if not self.mids:
                    break
            time.sleep(0.05)
        self.closing = True
        self.c.disconnect()
        self.net.join()


meta = []


def drain(cid, qos):
    got = []
    idle = threading.Event()
    last = [time.time()]

    def on_message(c, u, m):
        got.append(m.payload.decode())
        meta.append((m.payload.decode(), m.mid, m.dup))
        last[0] = time.time()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", PORT, clean_start=False, properties=connect_props(3600))
    c.loop_start()
    # Done once nothing arrives for 15 s: a store compaction (seconds for a large
    # backlog) holds back QoS 2 deliveries to the stored session while it runs, and a 3 s
    # limit once ended a drain early with messages still queued.
    while time.time() - last[0] < 15:
        time.sleep(0.1)
    c.disconnect()
    c.loop_stop()
    return got


failed = 0
crashed = False
try:
    start()
    subscribe_offline()
    pubs = [Publisher(i, 1 if i % 2 == 0 else 2) for i in range(4)]
    t0 = time.time()
    for k in range(KILLS):
        time.sleep(rng.uniform(2.5, 3.5))
        kill()
        start()
        if (k + 1) % 10 == 0:
            acked = sum(len(p.acked) for p in pubs)
            print(f"  {k + 1}/{KILLS} kills, {time.time() - t0:.0f} s, {acked} acknowledged so far")
    pubs_done = [p.finish(20) for p in pubs]
    for cid, qos in SUBSCRIBERS:
        got = drain(cid, qos)
        seen = set(got)
        for p in pubs:
            # Each subscriber receives every publisher's messages, at min(pub, sub) QoS.
            lost = p.acked - seen
            exactly_once = p.qos == 2 and qos == 2
            dups = len([x for x in got if x.startswith(f"p{p.idx}-")]) - len(
                {x for x in got if x.startswith(f"p{p.idx}-")}
            )
            status = "ok  "
            if lost or (exactly_once and dups):
                status = "FAIL"
                failed += 1
            print(
                f"{status} {cid} <- publisher {p.idx} (QoS {p.qos}): sent {p.sent}, acknowledged {len(p.acked)}, "
                f"lost {len(lost)}, duplicates {dups}{' (must be 0)' if exactly_once else ''}"
            )
            if lost:
                print("     first lost:", sorted(lost)[:5])
            if exactly_once and dups:
                seen_once = set()
                shown = 0
                for payload, mid, dup in meta:
                    if payload.startswith(f"p{p.idx}-") and payload in seen_once and shown < 5:
                        print(f"     duplicate {payload}: mid {mid} dup {dup}; all copies:",
                              [(mm, dd) for pp, mm, dd in meta if pp == payload])
                        shown += 1
                    seen_once.add(payload)
    print(f"crash harness: {KILLS} kills (seed {SEED}{f', {RATE:g} msg/s per publisher' if RATE else ''})")
except BaseException:
    crashed = True
    raise
finally:
    if broker and broker.poll() is None:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(15)
        except subprocess.TimeoutExpired:
            broker.kill()
    if failed or crashed:
        print("kept for inspection:", work)
    else:
        shutil.rmtree(work, ignore_errors=True)

print(f"crash: {8 - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)

"""Flood test: 1,000 hostile connections -- half sending garbage (and reconnecting when
closed), half stalling mid-CONNECT (slowloris, one byte every few seconds) -- while a normal
client (paho-mqtt, MQTT 3.1.1) keeps publishing to itself. Reports the normal client's
round-trip latency before and during the flood, its losses, what happened to the flood,
and the broker's RSS.

Usage: python3 flood.py BINARY [SECONDS]   (default 20 s of flood)
Passes when the normal client loses nothing, is never disconnected, and its p99 during the
flood stays under 50 ms (the flood generator shares this 2-core machine with the broker).
"""

import asyncio
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

BIN = sys.argv[1]
FLOOD_SECS = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
N = 1000

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))

work = tempfile.mkdtemp(prefix="halyard-flood-")
s = socket.socket()
s.bind(("127.0.0.1", 0))
PORT = s.getsockname()[1]
s.close()
cfg = os.path.join(work, "h.toml")
with open(cfg, "w") as f:
    f.write(f'listen = ["tcp://127.0.0.1:{PORT}"]\ndata_dir = "{work}/data"\nlog_level = "warn"\nconnect_timeout = 5\n')
broker = subprocess.Popen([BIN, "serve", "--config", cfg], stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "log"), "w"))
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", PORT), 0.2).close()
        break
    except OSError:
        time.sleep(0.05)


def rss_mb():
    with open(f"/proc/{broker.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- the normal client ---
lat, sent, got, disconnects = [], {}, set(), [0]
lock = threading.Lock()
ready = threading.Event()


def on_message(c, u, m):
    seq = int(m.payload)
    with lock:
        if seq in sent:
            lat.append((time.perf_counter() - sent[seq], time.perf_counter()))
            got.add(seq)


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="normal", protocol=mqtt.MQTTv311)
c.on_message = on_message
c.on_subscribe = lambda *a: ready.set()
c.on_disconnect = lambda *a: disconnects.__setitem__(0, disconnects[0] + 1)
c.connect("127.0.0.1", PORT, keepalive=30)
# paho leaves Nagle on; with it, a small QoS 1 round trip measures delayed ACKs, not us.
c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.loop_start()
c.subscribe("flood/rtt", 1)
assert ready.wait(5), "no SUBACK"
stop_pub = threading.Event()


def publisher():
    seq = 0
    while not stop_pub.is_set():
        with lock:
            sent[seq] = time.perf_counter()
        c.publish("flood/rtt", str(seq), qos=1)
        seq += 1
        time.sleep(0.01)


pt = threading.Thread(target=publisher, daemon=True)
pt.start()

# --- the flood ---
made = {"garbage": 0, "slowloris": 0}
closed_by_broker = {"garbage": 0, "slowloris": 0}


async def garbage(stop):
    rng = random.Random()
    while not stop.is_set():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", PORT)
            made["garbage"] += 1
            while not stop.is_set():
                w.write(rng.randbytes(rng.randint(1, 200)))
                await w.drain()
                data = await asyncio.wait_for(r.read(4096), 0.5) if rng.random() < 0.2 else b"x"
                if data == b"":
                    closed_by_broker["garbage"] += 1
                    break
                await asyncio.sleep(0.05)
            w.close()
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)


async def slowloris(stop):
    connect = bytes.fromhex("101000044d5154540502003c000003616263")
    while not stop.is_set():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", PORT)
            made["slowloris"] += 1
            for b in connect[:-1]:  # never the last byte
                if stop.is_set():
                    break
                w.write(bytes([b]))
                await w.drain()
                try:
                    if await asyncio.wait_for(r.read(1), 2.0) == b"":
                        closed_by_broker["slowloris"] += 1
                        break
                except asyncio.TimeoutError:
                    pass
            w.close()
        except OSError:
            await asyncio.sleep(0.05)


async def flood():
    stop = asyncio.Event()
    tasks = [asyncio.create_task(garbage(stop)) for _ in range(N // 2)]
    tasks += [asyncio.create_task(slowloris(stop)) for _ in range(N // 2)]
    await asyncio.sleep(FLOOD_SECS)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000 if xs else float("nan")


def run_flood():
    asyncio.run(flood())
    # Report what the flood saw back to the parent through the exit code's absence and a
    # line on stdout (the counters live in this child process).
    print(f"FLOODSTATS {made['garbage']} {closed_by_broker['garbage']} {made['slowloris']} {closed_by_broker['slowloris']}", flush=True)


time.sleep(5)
t_flood = time.perf_counter()
# The flood runs in its own process so it does not share this interpreter's lock with the
# normal client whose latency we measure.
import multiprocessing  # noqa: E402

r_pipe, w_pipe = multiprocessing.Pipe(duplex=False)


def child(w):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_flood()
    w.send(buf.getvalue())


proc = multiprocessing.Process(target=child, args=(w_pipe,))
proc.start()
out = r_pipe.recv()
proc.join()
t_end = time.perf_counter()
fs = [int(x) for x in out.split("FLOODSTATS ")[1].split()]
made["garbage"], closed_by_broker["garbage"], made["slowloris"], closed_by_broker["slowloris"] = fs
rss_during = rss_mb()
time.sleep(1)
stop_pub.set()
pt.join()
time.sleep(2)
with lock:
    base = [l for l, t in lat if t < t_flood]
    during = [l for l, t in lat if t_flood <= t < t_end]
    lost = len(sent) - len(got)
unexpected_disconnects = disconnects[0]
c.disconnect()
c.loop_stop()
broker.send_signal(signal.SIGTERM)
broker.wait(15)

print(f"normal client: {len(sent)} published, lost {lost}, disconnected {unexpected_disconnects} times")
print(f"round trip before the flood: p50 {pct(base, .5):.2f} ms, p99 {pct(base, .99):.2f} ms ({len(base)} messages)")
print(f"round trip during the flood: p50 {pct(during, .5):.2f} ms, p99 {pct(during, .99):.2f} ms, max {max(during) * 1000 if during else 0:.2f} ms ({len(during)} messages)")
print(f"flood: {made['garbage']} garbage connections ({closed_by_broker['garbage']} seen closed by the broker), "
      f"{made['slowloris']} slowloris connections ({closed_by_broker['slowloris']} closed by the connect timeout), "
      f"{N} at once for {FLOOD_SECS:.0f} s; broker RSS {rss_during:.1f} MB")
ok = lost == 0 and unexpected_disconnects == 0 and during and pct(during, .99) < 50
print("flood:", "ok" if ok else "FAIL")
sys.exit(0 if ok else 1)

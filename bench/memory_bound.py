"""Memory bound under a stalled subscriber: a subscriber that never reads its socket, a
publisher trying to push 1 GB of QoS 1 messages (64 KiB each, up to 64 unacknowledged) at
it. Per-session queue limits are lifted so that only the global budget
(`max_memory_bytes`, 64 MiB here) stands between the broker and the gigabyte. Samples the
broker's RSS every second and reports the peak against the budget.

Usage: python3 bench/memory_bound.py BINARY [SECONDS] [session]   (default 30 s)
With `session`, the default limits apply instead: the per-session queue bound (16 MiB)
drops what the stalled subscriber cannot hold, so the whole gigabyte flows through.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mqttwire import connect_v311, lp, rss_kib, subscribe, varint  # noqa: E402

BIN = sys.argv[1]
SECS = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
SESSION_MODE = len(sys.argv) > 3 and sys.argv[3] == "session"
BUDGET = 16 * 1024 * 1024 if SESSION_MODE else 64 * 1024 * 1024
SIZE = 64 * 1024
TOTAL = 1024 * 1024 * 1024

work = tempfile.mkdtemp(prefix="halyard-mem-")
s = socket.socket()
s.bind(("127.0.0.1", 0))
PORT = s.getsockname()[1]
s.close()
cfg = os.path.join(work, "h.toml")
with open(cfg, "w") as f:
    f.write(f'listen = ["tcp://127.0.0.1:{PORT}"]\ndata_dir = "{work}/data"\nlog_level = "warn"\n')
    if not SESSION_MODE:
        f.write(f"max_memory_bytes = {BUDGET}\nmax_queued_messages = 100000000\nmax_queued_bytes = 0\n")
    f.write("[persistence]\nsync = \"off\"\n")
broker = subprocess.Popen([BIN, "serve", "--config", cfg])
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", PORT), 0.2).close()
        break
    except OSError:
        time.sleep(0.05)


def rss_mb():
    return rss_kib(broker.pid) / 1024


baseline = rss_mb()
# The stalled subscriber: subscribes at QoS 1, then never reads again.
sub = socket.create_connection(("127.0.0.1", PORT))
sub.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
sub.sendall(connect_v311(b"stalled"))
sub.recv(4)
sub.sendall(subscribe(b"big/t", 1, False))
sub.recv(5)

pub = socket.create_connection(("127.0.0.1", PORT))
pub.sendall(connect_v311(b"pusher"))
pub.recv(4)
acked = [0]
sent = [0]
stop = threading.Event()


def reader():
    buf = b""
    pub.settimeout(0.5)
    while not stop.is_set():
        try:
            d = pub.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not d:
            break
        buf += d
        while len(buf) >= 4 and buf[0] == 0x40:
            acked[0] += 1
            buf = buf[4:]


threading.Thread(target=reader, daemon=True).start()
payload = b"\xab" * SIZE
peak = baseline
t0 = time.time()
last_sample = 0
pub.settimeout(0.5)
pid = 1
while time.time() - t0 < SECS and sent[0] * SIZE < TOTAL:
    if time.time() - last_sample >= 1:
        peak = max(peak, rss_mb())
        last_sample = time.time()
    if sent[0] - acked[0] >= 64:
        time.sleep(0.005)
        continue
    vh = lp(b"big/t") + struct.pack(">H", pid)
    pkt = b"\x32" + varint(len(vh) + SIZE) + vh + payload
    try:
        pub.sendall(pkt)
    except socket.timeout:
        continue
    sent[0] += 1
    pid = pid % 65535 + 1
peak = max(peak, rss_mb())
stop.set()
broker.terminate()
broker.wait(15)
print(f"published {sent[0] * SIZE / 2**20:.0f} MiB in {time.time() - t0:.0f} s, acknowledged {acked[0] * SIZE / 2**20:.0f} MiB"
      f"{' (the rest held back by the budget)' if acked[0] < sent[0] else ''}; broker RSS: {baseline:.1f} MB at start, peak {peak:.1f} MB; "
      f"{'per-session queue bound' if SESSION_MODE else 'budget'} {BUDGET / 2**20:.0f} MiB")
ok = peak < baseline + BUDGET / 2**20 + 64
print("memory bound:", "ok" if ok else "FAIL", f"(peak - start = {peak - baseline:.1f} MB; allowed budget + 64 MB overhead)")
sys.exit(0 if ok else 1)

"""Broker memory per message queued for an offline persistent session.

An offline v5 session (expiry 3600) subscribes to `rare/#` at QoS 1. A publisher then
sends N rounds of BUSY QoS 0 messages on `busy/t` (no subscriber) followed by one QoS 1
message on `rare/t` (100-byte payloads), all pipelined, so the broker reads them in large
chunks. It waits until every PUBACK (and a final PINGRESP) is back, so all N are queued,
then reports the growth of the broker's RSS per queued message.

BUSY > 0 shows whether a queued message pins the read buffer it arrived in; BUSY = 0 is
the plain cost of a queued message. SYNC is the persistence mode (`off`: memory only;
`batch`: the default, durable, so the store's in-memory image is included).

Usage: python3 bench/queued_memory.py BINARY [N=1000] [SYNC=off] [BUSY=600]
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mqttwire import connect_v5, publish_v5, rss_kib, subscribe  # noqa: E402


def recv_exactly(sock, n):
    got = 0
    while got < n:
        r = sock.recv(65536)
        if not r:
            raise RuntimeError("broker closed the connection")
        got += len(r)


BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
SYNC = sys.argv[3] if len(sys.argv) > 3 else "off"
BUSY = int(sys.argv[4]) if len(sys.argv) > 4 else 600

work = tempfile.mkdtemp(prefix="halyard-qmem-")
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
with open(f"{work}/halyard.toml", "w") as f:
    f.write(
        f'listen = ["tcp://127.0.0.1:{port}"]\ndata_dir = "{work}/data"\n'
        "max_queued_messages = 100000000\nmax_queued_bytes = 0\n"
        f'[persistence]\nsync = "{SYNC}"\n[admin]\nenabled = false\n'
    )
broker = subprocess.Popen(
    [BIN, "serve", "--config", f"{work}/halyard.toml"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    cwd=work,
)
try:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.025)
    sub = socket.create_connection(("127.0.0.1", port))
    sub.sendall(connect_v5(b"qmem-sub", 3600))
    sub.recv(100)  # CONNACK
    sub.sendall(subscribe(b"rare/#", 1, True))
    sub.recv(100)  # SUBACK
    sub.sendall(b"\xe0\x00")  # DISCONNECT: the session stays, offline
    sub.close()

    pub = socket.create_connection(("127.0.0.1", port))
    pub.sendall(connect_v5(b"qmem-pub", 0))
    pub.recv(100)  # CONNACK
    busy = b"".join(publish_v5(b"busy/t", b"x" * 100) for _ in range(BUSY))
    time.sleep(0.5)
    before = rss_kib(broker.pid)
    # Writes interleaved with non-blocking reads of the PUBACKs (4 bytes each), so
    # neither side's socket buffer fills.
    acks = 0
    for i in range(N):
        pub.sendall(busy + publish_v5(b"rare/t", b"r" * 100, 1, i % 65535 + 1))
        pub.setblocking(False)
        try:
            while r := pub.recv(65536):
                acks += len(r)
        except BlockingIOError:
            pass
        pub.setblocking(True)
    pub.sendall(b"\xc0\x00")  # PINGREQ: its PINGRESP comes after every PUBACK
    recv_exactly(pub, 4 * N + 2 - acks)
    time.sleep(1.0)  # the store writer applies its last group
    after = rss_kib(broker.pid)
    print(
        f"sync={SYNC} busy={BUSY}: {N} messages queued, RSS {before} -> {after} KiB, "
        f"{(after - before) * 1024 / N:.0f} B per queued message"
    )
finally:
    broker.kill()
    broker.wait()

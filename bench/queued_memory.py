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

import socket
import struct
import subprocess
import sys
import tempfile
import time


def varint(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def lp(x):
    return struct.pack(">H", len(x)) + x


def connect(cid, expiry):
    props = b"\x11" + struct.pack(">I", expiry) if expiry else b""
    body = lp(b"MQTT") + bytes([5, 0x00 if expiry else 0x02]) + struct.pack(">H", 60)
    body += varint(len(props)) + props + lp(cid)
    return b"\x10" + varint(len(body)) + body


def publish(topic, payload, qos=0, pid=1):
    body = lp(topic) + (struct.pack(">H", pid) if qos else b"") + b"\x00" + payload
    return bytes([0x30 | qos << 1]) + varint(len(body)) + body


def subscribe(f):
    body = struct.pack(">H", 1) + b"\x00" + lp(f) + b"\x01"
    return b"\x82" + varint(len(body)) + body


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


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
    sub.sendall(connect(b"qmem-sub", 3600))
    sub.recv(100)  # CONNACK
    sub.sendall(subscribe(b"rare/#"))
    sub.recv(100)  # SUBACK
    sub.sendall(b"\xe0\x00")  # DISCONNECT: the session stays, offline
    sub.close()

    pub = socket.create_connection(("127.0.0.1", port))
    pub.sendall(connect(b"qmem-pub", 0))
    pub.recv(100)  # CONNACK
    busy = b"".join(publish(b"busy/t", b"x" * 100) for _ in range(BUSY))
    time.sleep(0.5)
    before = rss_kib(broker.pid)
    # Writes interleaved with non-blocking reads of the PUBACKs (4 bytes each), so
    # neither side's socket buffer fills.
    acks = 0
    for i in range(N):
        pub.sendall(busy + publish(b"rare/t", b"r" * 100, 1, i % 65535 + 1))
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

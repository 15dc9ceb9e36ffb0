"""Raw MQTT encoding shared by the bench scripts that talk to a broker without a client
library (they need exact control of what is on the wire and when): variable byte
integers, length-prefixed strings, CONNECT, PUBLISH, SUBSCRIBE, and RSS from /proc."""

import struct


def varint(n):
    """Variable Byte Integer [MQTT-1.5.5]."""
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def lp(x):
    """Two-byte length prefix, then the bytes (UTF-8 strings and binary data)."""
    return struct.pack(">H", len(x)) + x


def connect_v5(cid, expiry):
    """5.0 CONNECT: Clean Start unless `expiry` (Session Expiry Interval) is set."""
    props = b"\x11" + struct.pack(">I", expiry) if expiry else b""
    body = lp(b"MQTT") + bytes([5, 0x00 if expiry else 0x02]) + struct.pack(">H", 60)
    body += varint(len(props)) + props + lp(cid)
    return b"\x10" + varint(len(body)) + body


def connect_v311(cid, keep_alive=0):
    """3.1.1 CONNECT with Clean Session."""
    body = lp(b"MQTT") + b"\x04\x02" + struct.pack(">H", keep_alive) + lp(cid)
    return b"\x10" + varint(len(body)) + body


def publish_v5(topic, payload, qos=0, pid=1):
    """5.0 PUBLISH without properties."""
    body = lp(topic) + (struct.pack(">H", pid) if qos else b"") + b"\x00" + payload
    return bytes([0x30 | qos << 1]) + varint(len(body)) + body


def subscribe(f, qos, v5, pid=1):
    body = struct.pack(">H", pid) + (b"\x00" if v5 else b"") + lp(f) + bytes([qos])
    return b"\x82" + varint(len(body)) + body


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")

"""MQTT 5 enhanced authentication with SCRAM, client side by the independent `scramp`
library (PyPI), over a minimal MQTT 5 packet layer written here from the specification
(CONNECT with Authentication Method/Data, AUTH 0x18 both ways, CONNACK with the server's
final message, section 4.12).

Usage: python3 scram_mqtt.py HOST PORT   (users alice/pencil as scram-sha-256 and
bob/builder as scram-sha-512 must be in the broker's password file)
Prints ok/FAIL lines; exit 1 on failure.
"""

import socket
import struct
import sys

from scramp import ScramClient

HOST, PORT = sys.argv[1], int(sys.argv[2])
passed = failed = 0


def check(name, cond):
    global passed, failed
    passed, failed = (passed + 1, failed) if cond else (passed, failed + 1)
    print(("ok   " if cond else "FAIL ") + name)


def varint(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def s(b):
    return struct.pack(">H", len(b)) + b


def props(method, data):
    p = b"\x15" + s(method.encode()) + b"\x16" + s(data)
    return varint(len(p)) + p


def packet(kind, body):
    return bytes([kind]) + varint(len(body)) + body


def connect(cid, method, data):
    vh = s(b"MQTT") + b"\x05" + b"\x02" + struct.pack(">H", 30) + props(method, data)
    return packet(0x10, vh + s(cid.encode()))


def auth(reason, method, data):
    return packet(0xF0, bytes([reason]) + props(method, data))


# Property id -> how to skip it: 'b' byte, 'h' u16, 'i' u32, 'v' varint, 's' string/binary,
# 'p' string pair.
KINDS = {1: "b", 2: "i", 3: "s", 8: "s", 9: "s", 0x0B: "v", 0x11: "i", 0x12: "s", 0x13: "h",
         0x15: "s", 0x16: "s", 0x17: "b", 0x18: "i", 0x19: "b", 0x1A: "s", 0x1C: "s", 0x1F: "s",
         0x21: "h", 0x22: "h", 0x23: "h", 0x24: "b", 0x25: "b", 0x26: "p", 0x27: "i", 0x28: "b",
         0x29: "b", 0x2A: "b"}


def read_varint(buf, i):
    n, mult = 0, 1
    while True:
        b = buf[i]
        i += 1
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return n, i


def parse_props(buf, i):
    n, i = read_varint(buf, i)
    end, out = i + n, {}
    while i < end:
        pid = buf[i]
        i += 1
        k = KINDS[pid]
        if k == "b":
            out[pid], i = buf[i], i + 1
        elif k == "h":
            out[pid], i = struct.unpack(">H", buf[i:i + 2])[0], i + 2
        elif k == "i":
            out[pid], i = struct.unpack(">I", buf[i:i + 4])[0], i + 4
        elif k == "v":
            out[pid], i = read_varint(buf, i)
        elif k == "s":
            ln = struct.unpack(">H", buf[i:i + 2])[0]
            out[pid], i = bytes(buf[i + 2:i + 2 + ln]), i + 2 + ln
        else:
            for _ in range(2):
                ln = struct.unpack(">H", buf[i:i + 2])[0]
                i += 2 + ln
    return out, end


def recv_packet(sock):
    hdr = sock.recv(1)
    if not hdr:
        return None, None
    n, mult = 0, 1
    while True:
        b = sock.recv(1)[0]
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            break
        body += chunk
    return hdr[0], body


def scram_login(user, password, mech, cid):
    c = ScramClient([mech], user, password)
    with socket.create_connection((HOST, PORT), 5) as sock:
        sock.sendall(connect(cid, mech, c.get_client_first().encode()))
        kind, body = recv_packet(sock)
        if kind != 0xF0 or body[0] != 0x18:
            return f"expected AUTH 0x18, got {kind and hex(kind)} {body[:1].hex() if body else ''}"
        p, _ = parse_props(body, 1)
        c.set_server_first(p[0x16].decode())
        sock.sendall(auth(0x18, mech, c.get_client_final().encode()))
        kind, body = recv_packet(sock)
        if kind != 0x20:
            return f"expected CONNACK, got {kind and hex(kind)}"
        reason = body[1]
        if reason != 0:
            return f"CONNACK 0x{reason:02x}"
        p, _ = parse_props(body, 2)
        try:
            c.set_server_final(p[0x16].decode())  # raises if the server signature is wrong
        except Exception as e:  # noqa: BLE001
            return f"server signature rejected: {e}"
        return "success"


check("SCRAM-SHA-256 (scramp client): CONNACK success, server signature verified",
      scram_login("alice", "pencil", "SCRAM-SHA-256", "py-alice") == "success")
check("SCRAM-SHA-512 (scramp client): CONNACK success, server signature verified",
      scram_login("bob", "builder", "SCRAM-SHA-512", "py-bob") == "success")
r = scram_login("alice", "wrong", "SCRAM-SHA-256", "py-bad")
check(f"SCRAM wrong password refused ({r})", r == "CONNACK 0x86")
print(f"scram: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)

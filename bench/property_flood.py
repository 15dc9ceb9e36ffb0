#!/usr/bin/env python3
"""Usage: bench/property_flood.py BIN. One v5 PUBLISH with 650,000 user properties (the review's attack) against BIN; prints
the broker's RSS before and after and what the client got back."""
import os, socket, subprocess, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare
bin_ = sys.argv[1]
port = compare.free_port()
work = tempfile.mkdtemp()
p = subprocess.Popen([bin_, "serve", "--listen", f"tcp://127.0.0.1:{port}", "--data-dir", work + "/d"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    compare.wait_port(port, p, "halyard")
    def rss():
        return int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")][0].split()[1])
    def varint(n):
        out = b""
        while True:
            b = n & 0x7F; n >>= 7
            out += bytes([b | (0x80 if n else 0)])
            if not n: return out
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(10)
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + b"\x00\x01c"
    s.sendall(b"\x10" + varint(len(body)) + body); s.recv(64)
    before = rss()
    prop = b"\x26\x00\x00\x00\x00"
    props = prop * 650_000
    vh = b"\x00\x03t/x" + varint(len(props)) + props
    pkt = b"\x31" + varint(len(vh) + 1) + vh + b"1"
    s.sendall(pkt)
    try:
        got = s.recv(64)
    except Exception as e:
        got = repr(e)
    print(f"wire {len(pkt)/1e6:.1f} MB; RSS before {before/1024:.1f} MB, after {rss()/1024:.1f} MB; reply {got[:8]!r}")
finally:
    p.terminate(); p.wait()
    import shutil; shutil.rmtree(work, ignore_errors=True)

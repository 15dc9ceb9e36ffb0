"""MQTT over ws:// and wss:// with Eclipse Paho (an independent implementation), MQTT 3.1.1
and 5.0, plus the HTTP errors a wrong request gets.

Usage: python3 transports_paho.py HOST WS_PORT WSS_PORT CAFILE TCP_PORT
Prints ok/FAIL lines; exit 1 on failure. Waits are on events with timeouts.
"""

import queue
import socket
import sys
import threading

import paho.mqtt.client as mqtt

HOST, WS, WSS, CA, TCP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
WAIT = 5.0
passed = failed = 0


def check(name, cond):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}")


def client(cid, proto, transport, port, tls=False):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, transport=transport)
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    if tls:
        c.tls_set(ca_certs=CA)
    msgs, connected, subscribed = queue.Queue(), threading.Event(), threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.on_message = lambda cl, u, m: msgs.put(m)
    c.on_subscribe = lambda *a: subscribed.set()
    host = "localhost" if tls else HOST
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not connected.wait(WAIT):
        raise RuntimeError(f"{cid}: no CONNACK over {transport}:{port}")
    c.msgs, c.subscribed = msgs, subscribed
    return c


for proto, name in [(mqtt.MQTTv311, "3.1.1"), (mqtt.MQTTv5, "5.0")]:
    for sub_t, sub_port, sub_tls, pub_t, pub_port, pub_tls, label in [
        ("websockets", WS, False, "websockets", WSS, True, "sub ws:// pub wss://"),
        ("websockets", WSS, True, "tcp", TCP, False, "sub wss:// pub tcp://"),
    ]:
        try:
            s = client(f"ws-sub-{name}", proto, sub_t, sub_port, sub_tls)
            p = client(f"ws-pub-{name}", proto, pub_t, pub_port, pub_tls)
            s.subscribe("ws/t", 1)
            s.subscribed.wait(WAIT)
            # A small message and one far larger than a single TCP segment (64-bit frame
            # length on the wire, read back in many pieces).
            big = bytes(range(256)) * 800
            p.publish("ws/t", b"hello", qos=1).wait_for_publish(WAIT)
            p.publish("ws/t", big, qos=1).wait_for_publish(WAIT)
            got = [s.msgs.get(timeout=WAIT).payload for _ in range(2)]
            check(f"{name} {label}: QoS 1 messages arrive intact (5 B and {len(big)} B)", got == [b"hello", big])
            for c in (s, p):
                c.disconnect()
                c.loop_stop()
        except Exception as e:  # noqa: BLE001 - report and go on
            check(f"{name} {label}: {e}", False)


def http(req):
    with socket.create_connection((HOST, WS), WAIT) as sock:
        sock.sendall(req.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


up = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
r = http(f"GET /nope HTTP/1.1\r\nHost: x\r\n{up}\r\n")
check("ws:// wrong path: HTTP 404", r.startswith("HTTP/1.1 404"))
r = http("GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
check("ws:// plain GET without Upgrade: HTTP 426", r.startswith("HTTP/1.1 426"))
r = http(f"GET /mqtt HTTP/1.1\r\nHost: x\r\n{up}Sec-WebSocket-Protocol: mqtt\r\n\r\n")
check("ws:// upgrade: 101 with subprotocol mqtt", r.startswith("HTTP/1.1 101") and "Sec-WebSocket-Protocol: mqtt" in r)

print(f"paho transports: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)

#!/usr/bin/env python3
"""Bridge throughput and queue cost.

    python3 bench/bridge.py target/release/halyard [--secs 10] [--runs 3]

Scenarios (all on loopback, QoS 1, 64-byte payloads, 4 publishers at the local broker,
one subscriber at the remote counting what arrives; `halyard bench pub/sub` drive them):

  halyard->mosquitto   a Halyard bridge forwarding to Debian's Mosquitto
  halyard->halyard     a Halyard bridge forwarding to a second Halyard
  mosquitto->mosquitto Mosquitto's own bridge forwarding to the same remote Mosquitto

The publishers run faster than any bridge, so what the remote receives per second is the
bridge's throughput. "CPU us/msg" is the local broker's CPU time (utime + stime from
/proc) per message received at the remote. "queue bytes/msg" is the growth of Halyard's
data directory per QoS 1 message queued for a remote that is down.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# Halyard's [persistence] sync for both Halyards: "batch" (the default: acknowledged means
# on disk) or "off" (what Mosquitto does between its periodic saves), to separate the
# bridge's own cost from durability's.
SYNC = os.environ.get("HALYARD_SYNC", "batch")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Procs:
    def __init__(self):
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="halyard-bridge-bench-")
        os.chmod(self.dir, 0o777)

    def start(self, args, port, what):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, what)
        return p

    def mosquitto(self, port, extra=""):
        conf = os.path.join(self.dir, f"mosq-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest none\n"
                    f"max_queued_messages 0\n{extra}\n")
        os.chmod(conf, 0o644)
        return self.start([MOSQUITTO, "-c", conf], port, "mosquitto")

    def halyard(self, binary, port, bridge_to=None, tag="h"):
        data = os.path.join(self.dir, f"data-{tag}-{port}")
        conf = os.path.join(self.dir, f"halyard-{port}.toml")
        text = (f'listen = ["tcp://127.0.0.1:{port}"]\ndata_dir = "{data}"\n'
                f'log_level = "warn"\nmax_inflight_messages = 1000\n'
                f'[persistence]\nsync = "{SYNC}"\n[admin]\nenabled = false\n')
        if bridge_to:
            text += (f'\n[[bridge]]\nname = "bench"\naddress = ["tcp://127.0.0.1:{bridge_to}"]\n'
                     f'topic = ["bench/# out 1"]\nrestart_timeout = [1, 1]\n'
                     f'notifications = false\nqueue_max_messages = 10000000\n'
                     f'queue_max_bytes = 0\n')
        with open(conf, "w") as f:
            f.write(text)
        return self.start([binary, "serve", "-c", conf], port, "halyard"), data

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_load(binary, local, remote, secs, tag, rate):
    sub = subprocess.Popen(
        [binary, "bench", "sub", "-p", str(remote), "--subs", "1", "-f", f"bench/{tag}/#",
         "--tag", tag, "-q", "1", "-d", str(secs + 3), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.5)  # the subscriber's SUBACK (a one-off start-up wait, not a measurement)
    pub = subprocess.run(
        [binary, "bench", "pub", "-p", str(local), "--pubs", "4", "-t", f"bench/{tag}/%i",
         "--tag", tag, "-q", "1", "-d", str(secs), "-r", str(rate), "--json"],
        capture_output=True, text=True, check=True)
    out, _ = sub.communicate()
    return json.loads(pub.stdout), json.loads(out)


def scenario(binary, name, secs, rate):
    p = Procs()
    try:
        remote = free_port()
        local = free_port()
        if name.endswith("->mosquitto"):
            p.mosquitto(remote)
        else:
            p.halyard(binary, remote, tag="remote")
        if name.startswith("halyard"):
            broker, _ = p.halyard(binary, local, bridge_to=remote, tag="local")
        else:
            broker = p.mosquitto(local, f"connection bench\naddress 127.0.0.1:{remote}\n"
                                        "topic bench/# out 1\ncleansession false\n"
                                        "notifications false\n")
        time.sleep(1)  # the bridge's first connect (start-up, not measured)
        cpu0 = cpu_seconds(broker.pid)
        t0 = time.time()
        pub, sub = run_load(binary, local, remote, secs, f"{name.replace('>', '')}{local}", rate)
        wall = time.time() - t0
        cpu = cpu_seconds(broker.pid) - cpu0
        received = sub["received"]
        # The subscriber started 0.5 s before the publishers; if it received everything,
        # the bridge kept up and this rate is a lower bound.
        return {
            "scenario": name,
            "published": pub["sent"],
            "received_at_remote": received,
            "drained": received >= pub["sent"],
            "msg_per_s": received / max(sub["seconds"] - 0.5, 1e-9),
            "cpu_us_per_msg": cpu * 1e6 / max(received, 1),
            "wall_s": wall,
        }
    finally:
        p.close()


def queue_cost(binary, messages):
    p = Procs()
    try:
        local = free_port()
        dead = free_port()  # nobody listens: the bridge queues
        _, data = p.halyard(binary, local, bridge_to=dead, tag="queue")
        time.sleep(0.5)
        before = du(data)
        subprocess.run(
            [binary, "pub", "-p", str(local), "-q", "1", "-t", "bench/q", "-l", "-V", "5"],
            input="".join(f"{i:064d}\n" for i in range(messages)), text=True, check=True,
            capture_output=True)
        after = du(data)
        return {"messages": messages, "bytes_per_msg": (after - before) / messages}
    finally:
        p.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queue-messages", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=0,
                    help="messages/s per publisher (4 publishers); 0: as fast as acknowledged")
    a = ap.parse_args()
    results = {}
    for name in ["halyard->mosquitto", "halyard->halyard", "mosquitto->mosquitto"]:
        runs = [scenario(a.binary, name, a.secs, a.rate) for _ in range(a.runs)]
        runs.sort(key=lambda r: r["msg_per_s"])
        results[name] = runs
        med = runs[len(runs) // 2]
        print(f"{name:22} median {med['msg_per_s']:>10,.0f} msg/s  "
              f"{med['cpu_us_per_msg']:6.1f} CPU us/msg  "
              f"{'(kept up)' if med['drained'] else '(backlog)'}  "
              "(runs: " + ", ".join(f"{r['msg_per_s']:,.0f}" for r in runs) + ")", flush=True)
    if a.queue_messages == 0:
        return
    q = queue_cost(a.binary, a.queue_messages)
    print(f"queue on disk: {q['bytes_per_msg']:.0f} bytes per queued 64-byte QoS 1 message "
          f"({q['messages']:,} messages)")
    results["queue"] = q
    with open(os.environ.get("BRIDGE_BENCH_JSON", "/dev/null"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Halyard vs Mosquitto, rumqttd and nats-server (MQTT), on one machine, reproducibly.

Each broker is started fresh for every run, pinned to CPU 0 (`taskset`); `halyard bench`
(the load generator: exact loss/duplicate counts from per-publisher sequence numbers, an
end-to-end window so a queueing broker cannot look fast) runs pinned to CPU 1. Runs
alternate brokers A B C D A B C D ... so drift hits all of them. Per run: delivered
msg/s, lost, duplicates, latency percentiles, broker CPU-µs per delivered message (user +
system time from /proc/PID/stat), broker RSS after the run. Prints medians and the
Halyard/peer ratios as a Markdown table; every run is also written as a JSON line.

Usage: bench/compare.py HALYARD_BIN [--runs 3] [--secs 5] [--brokers halyard,mosquitto,rumqttd,nats]
       [--scenarios fanin,pairs1,pairs2,fanout,latency,latency_rt,conn] [--out FILE.jsonl]
bench/compare.sh installs the peers and calls this.
BROKER_CPUS / GEN_CPUS (taskset lists, default 0 and 1) move them, e.g. BROKER_CPUS=0,1 for
the both-cores scaling run.

`latency_rt` is `latency` with the broker at real-time priority (`chrt -f 1`, every broker
alike). On the bench machine a kernel thread (`kdamond`, the VM's memory monitor) takes
the broker's core for 1-5 ms twice a second; with default scheduling that alone puts 0.1%
of messages over 1 ms for every broker, so `latency` shows the machine and `latency_rt`
the broker. Needs root or CAP_SYS_NICE; without it that scenario reports an error.
"""

import argparse
import resource
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")
BROKER_CPUS = os.environ.get("BROKER_CPUS", "0")
GEN_CPUS = os.environ.get("GEN_CPUS", "1")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, name, timeout=15):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on {port}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_conf(work, name, text):
    path = os.path.join(work, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def start_broker(kind, halyard, work, rt=False):
    port = free_port()
    pin = (["chrt", "-f", "1"] if rt else []) + ["taskset", "-c", BROKER_CPUS]
    if kind == "halyard":
        conf = write_conf(
            work, "halyard.toml",
            f'listen = ["tcp://127.0.0.1:{port}"]\ndata_dir = "{work}/data"\nlog_level = "warn"\n'
            "max_connections = 1000000\nsys_interval = 0\n[admin]\nenabled = false\n",
        )
        # bench/ab.py runs two builds of the broker under one generator.
        # Absolute: the broker runs in its work directory (a relative path from
        # bench/compare.sh failed there with exit 127).
        cmd = pin + [os.path.abspath(os.environ.get("HALYARD_BROKER", halyard)), "serve", "-c", conf]
    elif kind == "mosquitto":
        conf = write_conf(
            work, "mosquitto.conf",
            f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n"
            "max_queued_messages 10000\nmax_inflight_messages 100\npersistence false\n",
        )
        cmd = pin + [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf]
    elif kind == "rumqttd":
        # Generous limits, so it is not throttled (its defaults cap payloads and in-flight
        # messages low).
        conf = write_conf(
            work, "rumqttd.toml",
            f"""id = 0
[router]
id = 0
max_connections = 200000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
max_read_len = 10240

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 500
    dynamic_filters = true
""",
        )
        cmd = pin + [os.environ.get("RUMQTTD", "rumqttd"), "-c", conf, "-q"]
    elif kind == "nats":
        conf = write_conf(
            work, "nats.conf",
            f'server_name: bench\nlisten: "127.0.0.1:{free_port()}"\n'
            f'jetstream {{ store_dir: "{work}/js" }}\nmqtt {{ listen: "127.0.0.1:{port}" }}\n',
        )
        cmd = pin + [shutil.which("nats-server") or "nats-server", "-c", conf]
    else:
        raise ValueError(kind)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    wait_port(port, proc, kind)
    time.sleep(0.3)
    return proc, port


SCENARIOS = {
    # name: (description, bench args)
    "fanin": ("QoS 0 fan-in, 16 pubs -> 1 wildcard sub",
              ["pubsub", "-q", "0", "--pubs", "16", "--subs", "1", "--filter", "bench/%r/#"]),
    "pairs1": ("QoS 1, 16 pub/sub pairs", ["pubsub", "-q", "1", "--pubs", "16", "--subs", "16"]),
    "pairs2": ("QoS 2, 16 pub/sub pairs", ["pubsub", "-q", "2", "--pubs", "16", "--subs", "16"]),
    "fanout": ("QoS 0 fan-out, 1 pub -> 100 subs",
               ["pubsub", "-q", "0", "--pubs", "1", "--subs", "100", "--topic", "bench/%r/x",
                "--filter", "bench/%r/x"]),
    "latency": ("QoS 1 latency, 20k msg/s offered",
                ["pubsub", "-q", "1", "--pubs", "1", "--subs", "1", "--rate", "20000"]),
    "latency_rt": ("QoS 1 latency, 20k msg/s offered, broker at real-time priority",
                   ["pubsub", "-q", "1", "--pubs", "1", "--subs", "1", "--rate", "20000"]),
    "conn": ("10k idle connections", ["conn", "-c", "10000"]),
}


def run_one(kind, scenario, halyard, secs):
    work = tempfile.mkdtemp(prefix=f"cmp-{kind}-")
    proc, port = start_broker(kind, halyard, work, rt=scenario == "latency_rt")
    try:
        rss0 = rss_kb(proc.pid)
        t0 = cpu_ticks(proc.pid)
        # The generator's CPU (children's rusage grows when a waited-for child ends; the
        # broker is waited for only later): shows when the generator, not the broker, is
        # the limit.
        g0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        args = [halyard, "bench"] + SCENARIOS[scenario][1] + [
            "-p", str(port), "-V", "311", "-d", str(secs), "-k", "60", "--json"]
        if scenario == "conn":
            # Sample RSS while the connections are held.
            b = subprocess.Popen(["taskset", "-c", GEN_CPUS] + args, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            time.sleep(max(2.0, secs - 1.5))
            rss_held = rss_kb(proc.pid)
            out, _ = b.communicate(timeout=secs + 120)
        else:
            out = subprocess.run(["taskset", "-c", GEN_CPUS] + args, capture_output=True, text=True,
                                 timeout=secs + 120).stdout
            rss_held = None
        t1 = cpu_ticks(proc.pid)
        g1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss1 = rss_kb(proc.pid)
        r = json.loads(out) if out.strip() else {"error": "no output"}
        r.update(broker=kind, scenario=scenario, rss_kb_after=rss1, rss_kb_idle=rss0,
                 broker_cpu_s=(t1 - t0) / TICK,
                 generator_cpu_s=(g1.ru_utime + g1.ru_stime) - (g0.ru_utime + g0.ru_stime))
        if scenario == "conn":
            n = r.get("connected", 0) or 1
            r["bytes_per_conn"] = (rss_held - rss0) * 1024 / n
            r["rss_kb_held"] = rss_held
        else:
            delivered = r.get("received", 0)
            r["cpu_us_per_msg"] = (t1 - t0) / TICK * 1e6 / delivered if delivered else None
        return r
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("halyard")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--brokers", default="halyard,mosquitto,rumqttd,nats")
    ap.add_argument("--scenarios", default="fanin,pairs1,pairs2,fanout,latency,latency_rt,conn")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    brokers = a.brokers.split(",")
    scenarios = a.scenarios.split(",")
    out = open(a.out, "a") if a.out else None
    results = []
    for run in range(a.runs):
        for sc in scenarios:
            for b in brokers:
                try:
                    r = run_one(b, sc, a.halyard, a.secs + (3 if sc == "conn" else 0))
                except Exception as e:  # a broker that fails a scenario is reported, not fatal
                    r = {"broker": b, "scenario": sc, "error": str(e)}
                r["run"] = run
                results.append(r)
                if out:
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                brief = {k: r.get(k) for k in ("delivered_per_second", "lost", "duplicates",
                                                "cpu_us_per_msg", "bytes_per_conn", "error")}
                print(f"run {run + 1}/{a.runs} {sc:8} {b:10} {brief}", file=sys.stderr, flush=True)

    print(f"\nMedians of {a.runs} runs, {a.secs} s each; broker on CPU 0, `halyard bench` on CPU 1.\n")
    print("| scenario | broker | msg/s | CPU-µs/msg | lost | dups | p50 / p99 / p99.9 ms | RSS after | per conn | conn/s | broker / generator CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    table = {}
    for sc in scenarios:
        for b in brokers:
            rs = [r for r in results if r["broker"] == b and r["scenario"] == sc and "error" not in r]
            if not rs:
                errs = [r.get("error") for r in results if r["broker"] == b and r["scenario"] == sc]
                print(f"| {sc} | {b} | failed: {errs[0] if errs else '?'} ||||||||")
                continue
            lat = [r.get("latency_us") or {} for r in rs]
            row = {
                "rate": med([r.get("delivered_per_second") for r in rs]),
                "cpu": med([r.get("cpu_us_per_msg") for r in rs]),
                "lost": max(r.get("lost", 0) or 0 for r in rs),
                "dups": max(r.get("duplicates", 0) or 0 for r in rs),
                "p50": med([l.get("p50") for l in lat]),
                "p99": med([l.get("p99") for l in lat]),
                "p999": med([l.get("p999") for l in lat]),
                "rss": med([r.get("rss_kb_after") for r in rs]),
                "per_conn": med([r.get("bytes_per_conn") for r in rs]),
                "conn_rate": med([r.get("connections_per_second") for r in rs]),
                "gen": med([r.get("generator_cpu_s") for r in rs]),
                "bcpu": med([r.get("broker_cpu_s") for r in rs]),
            }
            table[(sc, b)] = row
            f = lambda v, fmt: "-" if v is None else fmt.format(v)
            print(f"| {sc} | {b} | {f(row['rate'], '{:,.0f}')} | {f(row['cpu'], '{:.2f}')} | {row['lost']} | "
                  f"{row['dups']} | {f(row['p50'] and row['p50'] / 1000, '{:.2f}')} / "
                  f"{f(row['p99'] and row['p99'] / 1000, '{:.2f}')} / {f(row['p999'] and row['p999'] / 1000, '{:.2f}')} | "
                  f"{f(row['rss'] and row['rss'] / 1024, '{:.1f} MB')} | {f(row['per_conn'], '{:,.0f} B')} | "
                  f"{f(row['conn_rate'], '{:,.0f}')} | {f(row['bcpu'], '{:.1f}')} / {f(row['gen'], '{:.1f}')} |")
    if "halyard" in brokers:
        print("\nHalyard / peer (throughput: higher is better; CPU-µs/msg: lower is better):\n")
        print("| scenario | peer | msg/s ratio | CPU-µs/msg ratio |")
        print("|---|---|---|---|")
        for sc in scenarios:
            h = table.get((sc, "halyard"))
            for b in brokers:
                p = table.get((sc, b))
                if b == "halyard" or not h or not p or sc == "conn":
                    continue
                rr = h["rate"] / p["rate"] if h["rate"] and p["rate"] else None
                cr = h["cpu"] / p["cpu"] if h["cpu"] and p["cpu"] else None
                print(f"| {sc} | {b} | {'-' if rr is None else f'{rr:.2f}x'} | {'-' if cr is None else f'{cr:.2f}x'} |")


if __name__ == "__main__":
    main()

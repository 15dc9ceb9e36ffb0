#!/usr/bin/env python3
"""Memory per idle connection of a Halyard build: RSS before, and while `halyard bench conn`
holds N connections.

Usage: bench/idle_memory.py BINARY [--conns 10000] [--runs 2] [--level warn]
                            [--protocol 311|5] [--keepalive SECS] [--no-thp]
Broker on CPU 0, the generator (the same binary) on CPU 1, as in compare.py. The matrix's
`conn` scenario is `--protocol 311 --keepalive 60 --level warn`; the default log level is
info. Prints bytes per connection per run.

Halyard is built with mimalloc's `no_thp` feature: it does not ask for transparent huge
pages, so on kernels in the usual `madvise` THP mode RSS counts 4 KiB pages. Builds before
that (and any build on a kernel in THP `always` mode) have RSS move in 2 MiB steps, 210
bytes per connection at 10k, which makes single runs land on one of two values.
`--no-thp` runs the broker with MIMALLOC_ALLOW_THP=0 (mimalloc then turns THP off for the
process with prctl): the precise figure whatever the build or the kernel's mode.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def once(binary, n, level, protocol, keepalive, thp=True):
    work = tempfile.mkdtemp(prefix="idle-")
    port = compare.free_port()
    with open(f"{work}/h.toml", "w") as f:
        f.write(f'listen = ["tcp://127.0.0.1:{port}"]\ndata_dir = "{work}/data"\n'
                f'log_level = "{level}"\nmax_connections = 1000000\nsys_interval = 0\n'
                '[admin]\nenabled = false\n')
    env = dict(os.environ)
    if not thp:
        env["MIMALLOC_ALLOW_THP"] = "0"
    broker = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "-c", f"{work}/h.toml"],
                              stderr=subprocess.DEVNULL, env=env)
    try:
        compare.wait_port(port, broker, "halyard")
        rss0 = compare.rss_kb(broker.pid)
        args = ["taskset", "-c", "1", binary, "bench", "conn", "-c", str(n), "-p", str(port),
                "-V", protocol, "-d", "4", "--json"]
        if keepalive:
            args += ["-k", str(keepalive)]
        gen = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        time.sleep(3)
        rss1 = compare.rss_kb(broker.pid)
        gen.wait()
        return (rss1 - rss0) * 1024 / n
    finally:
        broker.terminate()
        broker.wait()
        subprocess.run(["rm", "-rf", work])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--level", default="warn")
    ap.add_argument("--protocol", default="311")
    ap.add_argument("--keepalive", type=int, default=0)
    ap.add_argument("--no-thp", action="store_true",
                    help="broker without transparent huge pages (MIMALLOC_ALLOW_THP=0)")
    a = ap.parse_args()
    for _ in range(a.runs):
        b = once(a.binary, a.conns, a.level, a.protocol, a.keepalive, not a.no_thp)
        print(f"{b:,.0f} B per idle connection", flush=True)


if __name__ == "__main__":
    main()

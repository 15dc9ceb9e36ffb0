#!/usr/bin/env python3
"""A/B two Halyard builds: the same scenarios, the same generator, runs alternating A B A B.

Usage: bench/ab.py A_BIN B_BIN [--runs 5] [--secs 5] [--scenarios fanin,pairs1,fanout]
                   [--generator BIN]
The load generator is A_BIN (or --generator) for both, so only the broker differs. Prints, per scenario,
the median msg/s and broker CPU-µs per delivered message of each build and B/A. Used to
record what each optimisation step did (docs/benchmarks.md).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--scenarios", default="fanin,pairs1,fanout")
    ap.add_argument("--generator", default=None,
                    help="halyard binary whose `bench` drives both (default: A_BIN)")
    a = ap.parse_args()
    gen = a.generator or a.a
    res = {}
    for _ in range(a.runs):
        for sc in a.scenarios.split(","):
            for label, binary in (("A", a.a), ("B", a.b)):
                os.environ["HALYARD_BROKER"] = binary
                r = compare.run_one("halyard", sc, gen, a.secs)
                rate = r.get("received", 0) / a.secs if "received" in r else None
                res.setdefault((sc, label), []).append((rate, r.get("cpu_us_per_msg")))
                print(f"{sc} {label}: {rate or 0:,.0f} msg/s, {r.get('cpu_us_per_msg') or 0:.3f} CPU-µs/msg",
                      file=sys.stderr)
    print("| scenario | A msg/s | B msg/s | A CPU-µs/msg | B CPU-µs/msg | B/A CPU |")
    print("|---|---|---|---|---|---|")
    for sc in a.scenarios.split(","):
        ra = res[(sc, "A")]
        rb = res[(sc, "B")]
        ma, mb = compare.med([x[0] for x in ra]), compare.med([x[0] for x in rb])
        ca, cb = compare.med([x[1] for x in ra]), compare.med([x[1] for x in rb])
        ratio = f"{cb / ca:.2f}x" if ca and cb else "-"
        print(f"| {sc} | {ma or 0:,.0f} | {mb or 0:,.0f} | {ca or 0:.3f} | {cb or 0:.3f} | {ratio} |")


if __name__ == "__main__":
    main()

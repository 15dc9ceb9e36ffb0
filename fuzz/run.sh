#!/usr/bin/env bash
# Fuzz the codec on the stable toolchain (cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP
# unlocks them on stable). Usage: fuzz/run.sh [target] [seconds]   (default: decode 600)
# The corpus is seeded from the hand-written vectors so the fuzzer starts from real packets.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-decode}
secs=${2:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p "corpus/$target"
python3 - "$target" <<'PY'
import sys
target = sys.argv[1]
ctl = {"3.1": 0, "3.1.1": 1, "5": 2}
lines = open("../crates/halyard-codec/tests/vectors/invalid.txt").read().splitlines()
# A valid CONNECT per version, for the connection target (invalid packets then meet a live
# session rather than the CONNECT check only).
connect = {
    "3.1": "101100064d5149736470030200000003616263",
    "3.1.1": "100f00044d5154540402003c0003616263",
    "5": "101000044d5154540502003c000003616263",
}
# Sequences of valid packets after CONNECT: subscribe, publish QoS 0/1/2 with PUBREL,
# a retained message, ping, disconnect.
flows = [
    "8206000100012300",  # SUBSCRIBE id 1 "#" QoS 0 (3.1.1 form)
    "3206000161000161",  # PUBLISH QoS 1 "a" id 1 payload "a"
    "3406000161000262" "62020002",  # PUBLISH QoS 2 id 2, PUBREL id 2
    "310400016178" "c000" "e000",  # retained QoS 0, PINGREQ, DISCONNECT
]
for i, line in enumerate(l for l in lines if l[:1].isdigit()):
    cols = [c.strip() for c in line.split("|")]
    data = bytes([ctl[cols[0]]]) + bytes.fromhex(cols[3])
    if target == "connection":
        data = bytes([i % 64]) + bytes.fromhex(connect[cols[0]]) + bytes.fromhex(cols[3])
    open(f"corpus/{target}/seed-{i}", "wb").write(data)
if target == "connection":
    for v, c in connect.items():
        for j, f in enumerate(flows):
            open(f"corpus/{target}/flow-{v}-{j}", "wb").write(bytes([j * 7]) + bytes.fromhex(c + f))
PY
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run -O "$target" -- -max_total_time="$secs" -print_final_stats=1

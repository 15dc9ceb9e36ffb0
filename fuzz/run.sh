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
for i, line in enumerate(l for l in lines if l[:1].isdigit()):
    cols = [c.strip() for c in line.split("|")]
    data = bytes([ctl[cols[0]]]) + bytes.fromhex(cols[3])
    open(f"corpus/{target}/seed-{i}", "wb").write(data)
PY
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run -O "$target" -- -max_total_time="$secs" -print_final_stats=1

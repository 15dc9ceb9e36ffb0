#!/usr/bin/env bash
# The issue 9 comparison from a clean checkout: installs Mosquitto and nats-server (Debian
# packages) and rumqttd 0.20 (`cargo install`, into bench/.tools), builds Halyard (release),
# then runs bench/compare.py (brokers pinned to CPU 0, the generator to CPU 1, runs
# alternating brokers). Usage: bench/compare.sh [compare.py options...]
#   e.g. bench/compare.sh --runs 3 --secs 5
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v nats-server >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq mosquitto nats-server >/dev/null
fi
if [ ! -x bench/.tools/bin/rumqttd ]; then
  # Not --locked: its lock file pins metrics 0.22.1, which current rustc rejects
  # (E0521); a newer 0.22.x builds.
  cargo install rumqttd --version 0.20.0 --root bench/.tools
fi
cargo build --release -p halyard
mkdir -p bench/results
out="bench/results/compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
RUMQTTD="$PWD/bench/.tools/bin/rumqttd" python3 bench/compare.py target/release/halyard --out "$out" "$@"
echo "every run: $out" >&2

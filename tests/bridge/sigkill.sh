#!/usr/bin/env bash
# The long run of halyard/tests/bridge.rs's SIGKILL test: N QoS 1 and N/10 QoS 2 messages
# published while the remote Mosquitto is down, Halyard SIGKILLed and restarted, the
# remote back; every message must arrive once, in order (3.1.1 and 5.0 links).
#   bash tests/bridge/sigkill.sh 10000
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-10000}
start=$(date +%s)
HALYARD_BRIDGE_KILL_MESSAGES=$n cargo test -p halyard --test bridge \
  remote_down_and_halyard_sigkilled_nothing_acknowledged_is_lost -- --nocapture
echo "bridge SIGKILL run: $n QoS 1 + $((n / 10)) QoS 2 messages per link version, passed in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# The fault matrix and the exactly-once tests in a loop, for MINUTES (default 60), each
# round with fresh random fault moments (ANCHORFLOW_SOAK_SEED for the matrix; the kill
# loop draws a seed of its own every run).
# Not part of CI: run it before a release, or to chase a rare failure.
#   scripts/soak.sh [MINUTES]
# Stops at the first failure and keeps its output in the log it names.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-60}
deadline=$(( $(date +%s) + minutes * 60 ))
eval "$(scripts/test-env.sh start)"
trap 'scripts/test-env.sh stop' EXIT
cargo test --features fault-points --test fault_matrix --test exactly_once --no-run >&2
round=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  round=$((round + 1))
  log=${TMPDIR:-/tmp}/anchorflow-soak-$round.log
  export ANCHORFLOW_SOAK_SEED=$RANDOM$RANDOM
  echo "round $round ($(date -u +%H:%M:%S)), seed $ANCHORFLOW_SOAK_SEED, log $log" >&2
  if ! cargo test --features fault-points --test fault_matrix --test exactly_once -- --nocapture >"$log" 2>&1; then
    echo "round $round failed; see $log" >&2
    exit 1
  fi
done
echo "$round rounds passed in $minutes minutes" >&2

#!/usr/bin/env bash
# The nemesis of tests/nemesis.rs (a seeded random schedule of faults, then the oracle
# and the liveness bound) for as long as asked, one round after another, each with a
# fresh seed and a fresh topic, Redis and warehouse:
#   scripts/nemesis.sh [--minutes N] [--seed S] [--round-secs R] [--set KEY=VALUE]...
# --minutes (default 30): how long to keep starting rounds; --seed: replay one
# schedule once; --round-secs (default 240): each round's schedule length; --set: a
# setting for every instance (e.g. --set redis.commit=transaction).
# Stops at the first failure, printing the seed that replays it and the round's log.
# Not part of CI (the test command runs one short round). Needs root (a tmpfs disk).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=30 seed="" round_secs=240 sets=
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --round-secs) round_secs=$2; shift 2 ;;
    --set) sets=${sets:+$sets,}$2; shift 2 ;;
    *) echo "usage: $0 [--minutes N] [--seed S] [--round-secs R] [--set KEY=VALUE]..." >&2; exit 2 ;;
  esac
done
# The nemesis starts its own Redis and hosts the mock Kafka cluster; the suite's
# services are started for the helpers that look them up.
eval "$(scripts/test-env.sh start)"
trap 'scripts/test-env.sh stop' EXIT
cargo test --features fault-points --test nemesis --no-run >&2
deadline=$(( $(date +%s) + minutes * 60 ))
round=0 started=$(date +%s)
while :; do
  round=$((round + 1))
  this_seed=${seed:-$RANDOM$RANDOM$RANDOM}
  log=${TMPDIR:-/tmp}/anchorflow-nemesis-$round.log
  echo "round $round ($(date -u +%H:%M:%S)), seed $this_seed, ${round_secs} s, log $log" >&2
  if ! ANCHORFLOW_NEMESIS_SEED=$this_seed ANCHORFLOW_NEMESIS_SECS=$round_secs ANCHORFLOW_NEMESIS_SET=$sets \
      cargo test --features fault-points --test nemesis a_random_schedule -- --nocapture >"$log" 2>&1; then
    echo "round $round FAILED with seed $this_seed; replay: $0 --seed $this_seed --round-secs $round_secs${sets:+ --set $sets}; log $log" >&2
    exit 1
  fi
  grep -E "^ *[0-9.]+ s: schedule over|drained in|runs ended" "$log" | sed 's/^/  /' >&2 || true
  if [ -n "$seed" ] || [ "$(date +%s)" -ge "$deadline" ]; then break; fi
done
echo "$round rounds passed in $(( ($(date +%s) - started) / 60 )) minutes, no mismatch" >&2

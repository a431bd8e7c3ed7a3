#!/usr/bin/env bash
# The kill -9 loop of tests/exactly_once.rs with more iterations (default 200):
#   scripts/kill-loop.sh [ITERATIONS] [SEED]
# Prints each kill's moment and the seed that reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
export ANCHORFLOW_KILL_ITERATIONS="${1:-200}"
if [ -n "${2:-}" ]; then export ANCHORFLOW_KILL_SEED="$2"; fi
exec scripts/test.sh --test exactly_once kill_9 -- --nocapture

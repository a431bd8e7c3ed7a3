#!/usr/bin/env bash
# Runs `anchorflow bench` against the tansu broker and a private Redis (both started
# by scripts/test-env.sh). Extra arguments go to the bench, e.g. --events 300000.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/test-env.sh start)"
trap 'scripts/test-env.sh stop' EXIT
cargo run --release -- bench --brokers "$ANCHORFLOW_TEST_BROKERS" --redis-url "$ANCHORFLOW_TEST_REDIS_URL/0" "$@"

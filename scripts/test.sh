#!/usr/bin/env bash
# The whole test suite: brings up a private Redis and the tansu broker on free loopback
# ports, runs every test of the workspace against them, and stops them again.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/test-env.sh start)"
trap 'scripts/test-env.sh stop' EXIT
echo "redis: $ANCHORFLOW_TEST_REDIS_URL  kafka (tansu): $ANCHORFLOW_TEST_BROKERS" >&2
cargo test --workspace --features fault-points "$@"

#!/usr/bin/env bash
# The whole test suite: brings up a private Redis and the tansu broker on free loopback
# ports, runs every test of the workspace against them, and stops them again; then
# checks the Prometheus rules (promtool), formatting, clippy's lints and the docs
# (skipped when arguments pick tests).
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'scripts/test-env.sh stop' EXIT
# Assigned first: a service that does not start stops the run here (set -e), instead
# of every test that needs it failing for a variable that was never exported.
env=$(scripts/test-env.sh start)
eval "$env"
echo "redis: $ANCHORFLOW_TEST_REDIS_URL  kafka (tansu): $ANCHORFLOW_TEST_BROKERS" >&2
cargo test --workspace --features fault-points "$@"
# The code's own bars, on a whole-suite run: formatting, lints, and docs whose links
# resolve.
if [ $# -eq 0 ]; then
  # The shipped Prometheus configuration and alerting rules, and the rules' unit tests.
  promtool check config config/prometheus.yml
  (cd config && promtool test rules alerts.test.yml)
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --features fault-points -- -D warnings
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --features fault-points
fi

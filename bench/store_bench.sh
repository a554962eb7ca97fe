#!/usr/bin/env bash
# Store benchmark of kvshelf against the ceilings it measures itself in the
# same run (loopback TCP, memcpy): see bench/store_bench.py for the figures.
#   bench/store_bench.sh [--reps N] [--seconds S] [--markdown FILE] [--json FILE]
# Builds build/ first if the kvshelf binary is missing. Remote figures need
# root (a private mount namespace simulates a second host).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KVS_BUILD_DIR:-$root/build}
if [ ! -x "${KVSHELF_BIN:-$build/bin/kvshelf}" ]; then
  KVS_BUILD_DIR=$build "$root/scripts/build.sh"
fi
exec python3 "$root/bench/store_bench.py" --build "$build" "$@"

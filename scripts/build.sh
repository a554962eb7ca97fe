#!/usr/bin/env bash
# Configures and builds kvshelf into build/ (or $KVS_BUILD_DIR) from scratch if needed.
#   scripts/build.sh [extra cmake args...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bdir=${KVS_BUILD_DIR:-$root/build}
"$root/scripts/deps.sh"
cmake -S "$root" -B "$bdir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$bdir" -j"$(nproc)"

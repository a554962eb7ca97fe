#!/usr/bin/env bash
# Runs every test of kvshelf from a fresh machine:
#   1. installs missing Debian packages and the Python test tools,
#   2. builds from scratch and runs the unit tests (ctest) and the integration
#      and Python tests (pytest, real processes on loopback),
#   3. rebuilds with AddressSanitizer + UndefinedBehaviorSanitizer and runs the
#      C suites again,
#   4. runs every libFuzzer target briefly.
# Switches: KVS_SKIP_SANITIZE=1, KVS_SKIP_FUZZ=1, KVS_FUZZ_SECONDS (default 20),
#           KVSHELF_TEST_VLLM=1 (also the slow vLLM suite).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/deps.sh" --python
jobs=$(nproc)

step() { printf '\n==== %s ====\n' "$*"; }

step "build (release)"
rm -rf build
KVS_BUILD_DIR=build scripts/build.sh
export KVSHELF_BIN=$root/build/bin/kvshelf
export KVSHELF_RUNTIME_DIR=$(mktemp -d /tmp/kvshelf-test-rt.XXXXXX)
trap '"$KVSHELF_BIN" stop >/dev/null 2>&1 || true; rm -rf "$KVSHELF_RUNTIME_DIR"' EXIT

step "unit tests (ctest)"
ctest --test-dir build --output-on-failure -j"$jobs"

step "integration tests (pytest)"
python3 -m pytest -q tests/integration

if [ -d tests/python ] && [ -f pyproject.toml ]; then
  step "python package tests (pytest)"
  python3 -m pip install -q --disable-pip-version-check ./ 
  python3 -m pytest -q tests/python
fi

if [ "${KVS_SKIP_SANITIZE:-0}" != 1 ]; then
  step "ASan + UBSan build and tests"
  rm -rf build-asan
  KVS_BUILD_DIR=build-asan scripts/build.sh -DKVS_SANITIZE=ON -DKVS_WITH_CUDA=OFF
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  KVSHELF_BIN=$root/build-asan/bin/kvshelf ctest --test-dir build-asan --output-on-failure -j"$jobs"
  KVSHELF_BIN=$root/build-asan/bin/kvshelf python3 -m pytest -q tests/integration
fi

if [ "${KVS_SKIP_FUZZ:-0}" != 1 ] && [ -x scripts/fuzz.sh ]; then
  step "fuzzing (brief)"
  scripts/fuzz.sh --seconds "${KVS_FUZZ_SECONDS:-20}"
fi
step "all tests passed"

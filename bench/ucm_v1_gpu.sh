#!/usr/bin/env bash
# Issue 14 on a GPU machine, in one go: the connector's GPU unit tests, the
# Python GPU tests of the UCM stores, then bench/ucm_v1.py (kvshelf's V1
# store against UCM 0.8.1's own stores, layerwise and direct, 8k and 32k
# tokens of Qwen2.5-14B, beside the pinned-copy ceiling of the same run).
#
# Needs a carried build (bench/prepare_carry.sh into $KVS_CARRY, default
# .carry; the GPU test programs, if wanted, in $KVS_CARRY/tests) and UCM's
# wheel ($UCM_WHEEL, default build-ucmcarry/uc_manager_cuda_cu130-0.8.1-...).
# Logs and the bench's JSON go to $OUT (default ./gpu-out).
#   usage: bench/ucm_v1_gpu.sh [tests|bench|all] [extra bench/ucm_v1.py args]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
what=${1:-all}
shift || true
OUT=${OUT:-$root/gpu-out}
mkdir -p "$OUT"
export KVS_CARRY=${KVS_CARRY:-$root/.carry}
UCM_WHEEL=${UCM_WHEEL:-$root/build-ucmcarry/uc_manager_cuda_cu130-0.8.1-cp312-cp312-manylinux_2_28_x86_64.whl}
# shellcheck source=bench/carry_env.sh
. bench/carry_env.sh || exit 1
export PYTHONUNBUFFERED=1
log() { printf '\n==== %s ====\n' "$*"; }

log machine
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
# the pool's segment lives in /dev/shm: room for 3 x 6.4 GB (the 32k run)
shm_kb=$(df -k --output=size /dev/shm | tail -1)
if [ "$shm_kb" -lt $((40 * 1024 * 1024)) ] && [ "$(id -u)" = 0 ]; then
  mount -o remount,size=48G /dev/shm 2>&1
fi
df -h /dev/shm | tee -a "$OUT/gpu.txt"

status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  for t in "$KVS_CARRY"/tests/test_connector*_gpu; do
    [ -x "$t" ] || continue
    log "$(basename "$t")"
    timeout 120 "$t" >"$OUT/$(basename "$t").log" 2>&1 || status=1
    grep -E '^\[  (PASSED|FAILED)|FAILED|skipped' "$OUT/$(basename "$t").log" | tail -8
  done
  log "pytest: GPU tests of the UCM stores and parts"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/python/test_ucm_striped.py \
    tests/python/test_connector_parts.py >"$OUT/pytest.txt" 2>&1 || status=1
  tail -15 "$OUT/pytest.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  log "bench/ucm_v1.py"
  KVSHELF_CONNECTOR_PROFILE=${KVSHELF_CONNECTOR_PROFILE:-1} timeout 420 python3 bench/ucm_v1.py \
    --ucm-wheel "$UCM_WHEEL" --json "$OUT/ucm_v1.json" "$@" 2>&1 | tee "$OUT/ucm_v1.txt" || status=1
fi
log "status $status"
exit $status

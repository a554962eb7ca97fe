#!/usr/bin/env bash
# Runs the KV connector's GPU tests and bench/connector on a GPU machine and
# writes logs and a table under $OUT (default ./gpu-out).
#
# Binaries come from $KVS_GPU_BUILD (default .carry, as prepared by
# `bench/connector_gpu.sh --prepare BUILD_DIR` on a build machine: it copies
# bin/kvshelf, the test programs, bench/connector and the shared libraries
# they need that are not part of the C library into .carry/).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "${1:-}" = --prepare ]; then
  b=${2:?usage: connector_gpu.sh --prepare BUILD_DIR}
  rm -rf .carry && mkdir -p .carry/bin .carry/bench .carry/lib
  cp "$b/bin/kvshelf" .carry/bin/
  cp "$b/test_connector_gpu" "$b/test_connector_host" .carry/
  cp "$b/bench/connector" .carry/bench/
  for f in .carry/bin/kvshelf .carry/test_connector_gpu .carry/bench/connector; do ldd "$f"; done |
    awk '$3 ~ /^\// {print $3}' | sort -u |
    grep -vE '/(libc|libm|libgcc_s|libpthread|libdl|librt|ld-linux[^/]*)\.so' |
    xargs -r -I{} cp -L {} .carry/lib/
  du -sh .carry
  exit 0
fi

B=${KVS_GPU_BUILD:-.carry}
OUT=${OUT:-$root/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$root/$B/lib:${LD_LIBRARY_PATH:-}"
export KVSHELF_BIN="$root/$B/bin/kvshelf"
log() { printf '\n==== %s ====\n' "$*"; }

log machine
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
df -h /dev/shm | tee -a "$OUT/gpu.txt"
nproc; free -g | head -2
# The pool's segment lives in /dev/shm: make room for the 32k-token run.
shm_kb=$(df -k --output=size /dev/shm | tail -1)
if [ "$shm_kb" -lt $((24 * 1024 * 1024)) ] && [ "$(id -u)" = 0 ]; then
  mount -o remount,size=48G /dev/shm && df -h /dev/shm
fi

status=0
log "GPU tests (cuda-kernel and cuda-batch)"
timeout 300 "$B/test_connector_gpu" > "$OUT/test_gpu.log" 2>&1 || status=1
grep -E '^\[|skipped' "$OUT/test_gpu.log" | grep -v 'RUN\|OK \]' | tail -25
log "host tests"
timeout 200 "$B/test_connector_host" > "$OUT/test_host.log" 2>&1 || status=1
grep -E '^\[  (PASSED|FAILED)' "$OUT/test_host.log"

log "bench/connector (Qwen2.5-14B geometry)"
rt=$(mktemp -d /tmp/kvs-bench.XXXXXX)
"$KVSHELF_BIN" master --embedded --runtime-dir "$rt" --segment-size "${KVS_BENCH_SEGMENT:-10GiB}" \
  > "$OUT/master.log" 2>&1 &
mpid=$!
for _ in $(seq 200); do [ -S "$rt/master.sock" ] && break; sleep 0.05; done
export KVSHELF_RUNTIME_DIR=$rt
md="$OUT/bench.md"
: > "$md"
# auto = what an engine gets with default options; then each backend alone
timeout 400 "$B/bench/connector" --md "$md" --tokens 2048,8192,32768 --reps 5 \
  --variant auto:0 --variant cuda-kernel:4 --variant cuda-batch:4 ${KVS_BENCH_ARGS:-} 2>&1 |
  tee "$OUT/bench.txt" || status=1
if [ -z "${KVS_BENCH_QUICK:-}" ]; then
  log "small chunks: 2 KV heads (8 KiB chunks, as TP=4), 32k tokens"
  timeout 200 "$B/bench/connector" --md "$md" --tokens 32768 --kv-heads 2 --reps 5 \
    --variant auto:0 --variant cuda-batch:4 2>&1 | tee -a "$OUT/bench.txt" || status=1
fi
kill "$mpid" 2>/dev/null; wait "$mpid" 2>/dev/null
rm -rf "$rt"
log "status $status"
exit $status

#!/usr/bin/env bash
# The tensor-parallel benchmark (bench/tp.py, issue 6) on a GPU machine, both
# deployment modes, in about 4 minutes at most:
#
#   here:            bench/prepare_carry.sh          (builds .carry/, see there)
#   GPU machine:     bash bench/tp_gpu.sh [tp.py options...]
#                    (repo root; .carry/ carried along; $OUT collects the results)
#
# Two ranks (TP=2, KVS_TP_WORLD) as two processes: rank r on cuda:r when the
# machine has more than r GPUs, else on cuda:0 (one GPU shared by both ranks:
# total ~= one rank is expected there, the >= 1.8x target needs a GPU per rank).
# Writes into $OUT (default build/tp): tp-gpu.log (everything printed),
# tp-embedded.{md,json} and tp-master.{md,json}.
# Each mode runs under `timeout` (KVS_TP_TIMEOUT, default 120 s).
# env: KVS_TP_TOKENS (32768), KVS_TP_POOL (16GiB), KVS_TP_REPEATS (3).
# Exit status: 0 if both modes ran and passed their correctness checks.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
out=${OUT:-$root/build/tp}
mkdir -p "$out"
exec > >(tee "$out/tp-gpu.log") 2>&1
export PYTHONUNBUFFERED=1

echo "== machine ($(date -u +%FT%TZ))"
command -v nvidia-smi >/dev/null || echo "WARNING: no nvidia-smi"
nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,pcie.link.gen.max,pcie.link.width.max \
  --format=csv 2>/dev/null || true
nvidia-smi topo -m 2>/dev/null | head -12 || true
echo "$(uname -srm); $(ldd --version 2>&1 | head -1); $(nproc) CPUs; python3 $(python3 -c 'import platform; print(platform.python_version())')"
free -g | head -2
# Segments are files in /dev/shm: it must hold the pool (16 GiB by default).
shm_gib=$(df -k --output=size /dev/shm 2>/dev/null | tail -1 | awk '{print int($1/1048576)}')
echo "/dev/shm: ${shm_gib:-?} GiB"
# (only on a GPU machine and as root: a CPU check of this script leaves the host alone)
if command -v nvidia-smi >/dev/null && [ -n "${shm_gib:-}" ] && [ "$shm_gib" -lt 32 ] && [ "$(id -u)" = 0 ]; then
  echo "/dev/shm is small: remounting it with size=64g"
  mount -o remount,size=64g /dev/shm 2>&1 || echo "WARNING: could not enlarge /dev/shm"
  df -h /dev/shm | tail -1
fi

echo "== kvshelf"
# shellcheck source=bench/carry_env.sh
. "$root/bench/carry_env.sh" || exit 1
python3 - <<'EOF' || exit 1
import os, torch, kvshelf
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {n} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(n))
      + f"; kvshelf {kvshelf.__version__} from {os.path.dirname(kvshelf.__file__)}, "
      f"KVSHELF_BIN {os.environ.get('KVSHELF_BIN')}")
EOF

rc=0
for mode in embedded master; do
  echo "== tp.py --mode $mode"
  timeout -k 10 "${KVS_TP_TIMEOUT:-120}" python3 -u bench/tp.py --mode "$mode" --out "$out" \
    --world-size "${KVS_TP_WORLD:-2}" --tokens "${KVS_TP_TOKENS:-32768}" --pool-size "${KVS_TP_POOL:-16GiB}" \
    --repeats "${KVS_TP_REPEATS:-3}" "$@"
  r=$?
  echo "== tp.py --mode $mode: exit $r"
  [ $r -eq 0 ] || rc=1
  # nothing of this mode may outlive it (tp.py stops the pool / the daemons it started)
  pgrep -a -f 'kvshelf (master|node)' || true
done
echo "== files in $out"
ls -la "$out"
exit $rc

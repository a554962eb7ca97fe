#!/usr/bin/env bash
# The TTFT benchmark (bench/ttft.py) on a GPU machine, both deployment modes,
# in one command that fits one 10-minute call:
#
#   here:            bench/prepare_carry.sh          (builds .carry/, see there)
#   GPU machine:     bash bench/ttft_gpu.sh [ttft.py options...]
#                    (repo root; .carry/ carried along; $OUT collects the results)
#
# Writes into $OUT (default build/ttft): ttft-gpu.log (everything printed),
# ttft-embedded.{md,json,png} and ttft-master.{md,json,png} — 7 files.
# Each mode runs under `timeout` (KVS_TTFT_TIMEOUT, default 270 s) with
# ttft.py --time-budget (KVS_TTFT_BUDGET, default 190 s for the measured
# lengths), so a hang or a slow machine in one mode leaves time for the other.
# Exit status: 0 if both modes ran and passed their correctness checks.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
out=${OUT:-$root/build/ttft}
mkdir -p "$out"
exec > >(tee "$out/ttft-gpu.log") 2>&1
export PYTHONUNBUFFERED=1
pool=${KVS_TTFT_POOL:-24GiB}

echo "== machine ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,pcie.link.gen.max,pcie.link.width.max \
  --format=csv 2>&1 || true
echo "$(uname -srm); $(ldd --version 2>&1 | head -1); $(nproc) CPUs; python3 $(python3 -c 'import platform; print(platform.python_version())')"
free -g | head -2
# Segments are files in /dev/shm: it must hold the pool (24 GiB by default).
shm_gib=$(df -k --output=size /dev/shm 2>/dev/null | tail -1 | awk '{print int($1/1048576)}')
echo "/dev/shm: ${shm_gib:-?} GiB"
if [ -z "${KVS_TTFT_CPU:-}" ] && [ -n "${shm_gib:-}" ] && [ "$shm_gib" -lt 40 ]; then
  echo "/dev/shm is small: remounting it with size=64g"
  mount -o remount,size=64g /dev/shm 2>&1 || echo "WARNING: could not enlarge /dev/shm"
  df -h /dev/shm | tail -1
fi

echo "== kvshelf"
# shellcheck source=bench/carry_env.sh
. "$root/bench/carry_env.sh" || exit 1
python3 - <<'EOF' || exit 1
import os, tempfile, time
cpu = bool(os.environ.get("KVS_TTFT_CPU"))  # local test of this script: no GPU, host tensors
import torch, transformers, kvshelf
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"kvshelf {kvshelf.__version__} from {os.path.dirname(kvshelf.__file__)}, KVSHELF_BIN {os.environ.get('KVSHELF_BIN')}")
try:
    import matplotlib
    print(f"matplotlib {matplotlib.__version__}")
except Exception as e:
    print(f"WARNING: no matplotlib ({e}): no PNG")
dev = "cpu" if cpu else "cuda"
if not cpu:
    assert torch.cuda.is_available(), "torch sees no GPU"
    print(f"GPU: {torch.cuda.get_device_name(0)}")
# A GPU connector through a small embedded pool: dump, lookup, load, compare.
rd = tempfile.mkdtemp(prefix="kvshelf-preflight-")
t0 = time.time()
x = torch.randn(2, 4, 8 * 16, 64, device=dev, dtype=torch.bfloat16)  # [blocks..] per-head layout
y = torch.zeros_like(x)
lay = lambda t: [(t[i].data_ptr(), 16 * 64 * 2, 16 * 64 * 2, 8 * 16 * 64 * 2, 4) for i in range(2)]
cfg = {"runtime_dir": rd, "global_segment_size": 64 << 20}
a = kvshelf.Connector(cfg, namespace="preflight", device=-2 if cpu else 0, use_env=False)
b = kvshelf.Connector(cfg, namespace="preflight", device=-2 if cpu else 0, use_env=False)
a.register_layout(lay(x), 8)
b.register_layout(lay(y), 8)
ev = None if cpu else torch.cuda.Event()
if ev is not None:
    ev.record()
hs = [bytes([i + 1]) * 16 for i in range(8)]
t = a.dump(hs, list(range(8)), event=ev)
t.wait()
n = b.lookup_prefix(hs)
t2 = b.load(hs, list(range(8)))
t2.wait()
ok = torch.equal(x, y)
print(f"preflight: backend {a.backend}, dump {t.results()}, lookup_prefix {n}/8, load {t2.results()}, "
      f"equal {ok}, {time.time() - t0:.1f} s")
a.close(); b.close()
kvshelf.stop_pool(rd)
assert ok and n == 8, "preflight failed"
EOF

rc=0
for mode in embedded master; do
  echo "== ttft.py --mode $mode"
  timeout -k 10 "${KVS_TTFT_TIMEOUT:-270}" python3 -u bench/ttft.py --mode "$mode" --out "$out" \
    --pool-size "$pool" --time-budget "${KVS_TTFT_BUDGET:-190}" "$@"
  r=$?
  echo "== ttft.py --mode $mode: exit $r"
  [ $r -eq 0 ] || rc=1
  # nothing of this mode may outlive it (the embedded pool is stopped by ttft.py)
  pgrep -a -f 'kvshelf (master|node)' || true
done
echo "== files in $out"
ls -la "$out"
exit $rc

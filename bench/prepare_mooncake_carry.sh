#!/usr/bin/env bash
# Adds Mooncake to .carry/ (ignored by git) for the Mooncake tests on a GPU
# machine without a package registry (tests/python/test_mooncake_cuda.py):
#
#   .carry/mooncake-venv.tar.xz (about 25 MB; unpacked 90 MB, too much for a
#                               64 MiB carry) of mooncake-venv/: the layout
#                               tests/integration/mooncake_env.py expects of its
#                               venv, for CPython 3.12: the cp312 wheel of its pin
#                               (mooncake_env.MOONCAKE_REQ) in
#                               lib/python3.12/site-packages (less its benchmark
#                               and client programs), bin/mooncake_master (runs
#                               the wheel's binary) and the stamp file
#   .carry/lib/libibverbs.so.1, libnuma.so.1
#                               Mooncake's libraries need them; bench/carry_env.sh
#                               uses them only where the system lacks them
#   .carry/sbin/ip (+ its libraries in .carry/lib)
#                               iproute2's ip: the tests and bench/ttft.py put
#                               mooncake_master in a network namespace they make,
#                               and the GPU image has no iproute2
#
# On the GPU machine, after `. bench/carry_env.sh`:
#   tar -xJf .carry/mooncake-venv.tar.xz -C /tmp
#   export KVSHELF_MOONCAKE_VENV=/tmp/mooncake-venv
#   export KVSHELF_MC_SITE=$KVSHELF_MOONCAKE_VENV/lib/python3.12/site-packages
#   (bench/carry_env.sh puts $KVS_CARRY/sbin on PATH where there is no ip)
#
# The wheel comes from $KVSHELF_MOONCAKE_PY312 (default
# ~/.cache/kvshelf/mooncake-0.3.13.post1-py312, as tests/python/test_ucm_mooncake.py
# provisions it), installed there first with CPython 3.12's pip when missing.
# env: KVS_CARRY_DIR (default .carry), KVS_CARRY_PYTHON (a CPython 3.12).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
carry=${KVS_CARRY_DIR:-$root/.carry}
req=$(cd "$root/tests/integration" && python3 -c 'import mooncake_env; print(mooncake_env.MOONCAKE_REQ)')
src=${KVSHELF_MOONCAKE_PY312:-$HOME/.cache/kvshelf/mooncake-0.3.13.post1-py312}
if [ ! -f "$src/mooncake/store.so" ] || [ ! -x "$src/mooncake/mooncake_master" ]; then
  py=${KVS_CARRY_PYTHON:-python3.12}
  echo "prepare_mooncake_carry: installing $req for $py into $src"
  "$py" -m pip install -q --disable-pip-version-check --no-deps --upgrade --target "$src" "$req"
fi
work=$(mktemp -d /tmp/kvshelf-mc-carry.XXXXXX)
trap 'rm -rf "$work"' EXIT
v=$work/mooncake-venv
sp=$v/lib/python3.12/site-packages
mkdir -p "$sp" "$v/bin" "$carry/lib"
cp -a "$src/mooncake" "$src"/mooncake_transfer_engine_non_cuda* "$sp/"
rm -rf "$sp/mooncake/transfer_engine_bench" "$sp/mooncake/mooncake_client" "$sp/mooncake/__pycache__"
cat >"$v/bin/mooncake_master" <<'EOF'
#!/bin/sh
# the wheel's mooncake_master (its RPATH finds the wheel's bundled libraries)
d=$(cd "$(dirname "$0")/.." && pwd)
exec "$d/lib/python3.12/site-packages/mooncake/mooncake_master" "$@"
EOF
chmod +x "$v/bin/mooncake_master"
printf '%s\n' "$req" >"$v/.kvshelf-mooncake-ok"
tar -C "$work" -cf - mooncake-venv | xz -T2 -6 >"$carry/mooncake-venv.tar.xz"
for so in libibverbs.so.1 libnuma.so.1; do
  p=$(ldconfig -p | awk -v n="$so" '$1 == n { print $NF; exit }')
  if [ -z "$p" ]; then
    echo "prepare_mooncake_carry: $so not found here (scripts/deps.sh installs libibverbs1)" >&2
    exit 1
  fi
  cp -L "$p" "$carry/lib/$so"
done
# iproute2's ip and the libraries it needs beyond glibc
ipbin=$(command -v ip || true)
[ -n "$ipbin" ] || { echo "prepare_mooncake_carry: no ip here (apt-get install iproute2)" >&2; exit 1; }
mkdir -p "$carry/sbin"
cp -L "$ipbin" "$carry/sbin/ip"
ldd "$ipbin" | awk '/=> \//{print $1, $3}' | while read -r name path; do
  case $name in libc.so* | libm.so* | ld-linux*) continue ;; esac
  [ -e "$carry/lib/$name" ] || cp -L "$path" "$carry/lib/$name"
done
echo "prepare_mooncake_carry: $req in $carry/mooncake-venv.tar.xz ($(du -sh "$carry/mooncake-venv.tar.xz" | cut -f1)); libibverbs.so.1, libnuma.so.1 in $carry/lib; ip in $carry/sbin"

# shellcheck shell=bash
# Source this (bash) on a machine that got .carry/ from bench/prepare_carry.sh:
#   . bench/carry_env.sh            (from the repo root; or KVS_CARRY=/path/.carry)
# Sets PYTHONPATH (the carried kvshelf package), KVSHELF_BIN (the carried CLI)
# and LD_LIBRARY_PATH. System libraries come first: a carried library is used
# only for a soname the system lacks (libkvshelf always), then the result is
# checked by importing kvshelf and running the CLI; if that fails, every
# carried library is used instead. Returns non-zero if neither works.
# Prints what it chose. Needs bash (sourced), ldconfig, python3.

kvs_carry=${KVS_CARRY:-$PWD/.carry}
if [ ! -d "$kvs_carry/python/kvshelf" ] || [ ! -x "$kvs_carry/bin/kvshelf" ]; then
  echo "carry_env: no carried build in $kvs_carry (run bench/prepare_carry.sh where the -dev packages are)" >&2
  return 1 2>/dev/null || exit 1
fi
kvs_carry=$(cd "$kvs_carry" && pwd)
export PYTHONPATH="$kvs_carry/python${PYTHONPATH:+:$PYTHONPATH}"
# iproute2's ip (bench/prepare_mooncake_carry.sh) where the machine has none
if ! command -v ip >/dev/null 2>&1 && [ -x "$kvs_carry/sbin/ip" ]; then
  export PATH="$PATH:$kvs_carry/sbin"
fi
export KVSHELF_BIN="$kvs_carry/bin/kvshelf"
kvs_ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
kvs_syslibs=$("$kvs_ldconfig" -p 2>/dev/null || true)
kvs_gap=$(mktemp -d /tmp/kvshelf-carry-lib.XXXXXX)
kvs_from_carry=""
for kvs_f in "$kvs_carry"/lib/*.so*; do
  kvs_n=$(basename "$kvs_f")
  case $kvs_n in
  libkvshelf*) ;;
  *) if grep -q "^[[:space:]]*$kvs_n " <<<"$kvs_syslibs"; then continue; fi ;;
  esac
  ln -sf "$kvs_f" "$kvs_gap/$kvs_n"
  kvs_from_carry="$kvs_from_carry $kvs_n"
done
kvs_base_ld=${LD_LIBRARY_PATH:-}
kvs_check() {
  LD_LIBRARY_PATH="$1${kvs_base_ld:+:$kvs_base_ld}" python3 -c 'import kvshelf' 2>&1 &&
    LD_LIBRARY_PATH="$1${kvs_base_ld:+:$kvs_base_ld}" "$KVSHELF_BIN" --help >/dev/null 2>&1
}
if kvs_out=$(kvs_check "$kvs_gap"); then
  export LD_LIBRARY_PATH="$kvs_gap${kvs_base_ld:+:$kvs_base_ld}"
  echo "carry_env: kvshelf from $kvs_carry (MANIFEST: $(sed -n 2p "$kvs_carry/MANIFEST" 2>/dev/null)); carried libraries used:${kvs_from_carry:- none}; the rest from the system"
elif kvs_out2=$(kvs_check "$kvs_carry/lib"); then
  export LD_LIBRARY_PATH="$kvs_carry/lib${kvs_base_ld:+:$kvs_base_ld}"
  echo "carry_env: system libraries did not do ($kvs_out); using every carried library from $kvs_carry/lib"
else
  echo "carry_env: kvshelf does not load with the carried files:" >&2
  echo "  system first: $kvs_out" >&2
  echo "  carry only:   $kvs_out2" >&2
  LD_LIBRARY_PATH="$kvs_carry/lib" ldd "$KVSHELF_BIN" "$kvs_carry"/python/kvshelf/_kvshelf*.so >&2 || true
  return 1 2>/dev/null || exit 1
fi
unset kvs_f kvs_n kvs_syslibs kvs_out kvs_out2 kvs_ldconfig kvs_base_ld

#!/usr/bin/env bash
# Prepares .carry/ (ignored by git): what a GPU machine without our Debian
# -dev packages and without a package registry needs to run kvshelf, built
# here (x86-64, glibc 2.36) for CPython 3.12 (the GPU image's python3):
#
#   .carry/python/kvshelf/      the Python package: *.py, the C extension
#                               _kvshelf.cpython-312-*.so (libkvshelf linked in,
#                               CUDA backends included) and bin/kvshelf
#   .carry/bin/kvshelf          the CLI (master, node, status, stop, ...)
#   .carry/lib/                 libkvshelf.so* and every shared library the
#                               files above need that is not part of glibc
#                               (xxhash, cJSON, libmicrohttpd, libcurl, OpenSSL
#                               and their own dependencies)
#   .carry/MANIFEST             what was built, from which commit, with what
# (KVS_CARRY_DIR puts it elsewhere.)
#
# bench/carry_env.sh, sourced on the GPU machine, puts them to use (system
# libraries first, carried ones only where the system lacks them).
# It adds to an existing .carry/ (run `bench/connector_gpu.sh --prepare`, which
# starts .carry/ afresh, before this one when both are wanted).
#
# usage: bench/prepare_carry.sh [EXTRA_ELF...]
#   EXTRA_ELF  more programs or libraries (e.g. build/carry/bench/connector) to
#              copy into .carry/bin (executables) or .carry/lib, deps included
# env:  KVS_CARRY_PYTHON  a CPython 3.12 interpreter (default: python3.12 on
#                         PATH, then pyenv's newest 3.12)
#       KVS_CARRY_BUILD   build folder (default build/carry)
#       KVS_CARRY_TARGETS extra CMake targets to build (e.g. bench_connector)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
carry=${KVS_CARRY_DIR:-$root/.carry}
build=${KVS_CARRY_BUILD:-$root/build/carry}

py=${KVS_CARRY_PYTHON:-}
if [ -z "$py" ]; then
  if command -v python3.12 >/dev/null && python3.12 -c 'import sys' 2>/dev/null; then
    py=$(command -v python3.12)
  elif command -v pyenv >/dev/null; then
    v=$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)
    [ -n "$v" ] && py=$(pyenv root)/versions/$v/bin/python3.12
  fi
fi
if [ -z "$py" ] || ! "$py" -c 'import sys' 2>/dev/null; then
  echo "prepare_carry: no CPython 3.12 found (set KVS_CARRY_PYTHON)" >&2
  exit 1
fi
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null ||
  echo "prepare_carry: WARNING: $py is not CPython 3.12, the GPU image's python3"
echo "prepare_carry: CPython $("$py" -c 'import platform; print(platform.python_version())') at $py"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DKVS_TESTS=OFF -DKVS_PYTHON=ON \
  -DKVS_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE="$py" \
  -DPython_FIND_STRATEGY=LOCATION >"$build.cmake.log" 2>&1 || {
  tail -30 "$build.cmake.log" >&2
  exit 1
}
grep -q 'CUDA backends ON' "$build.cmake.log" || {
  echo "prepare_carry: CMake found no CUDA toolkit: the GPU machine would get the host backend only" >&2
  exit 1
}
# shellcheck disable=SC2086
cmake --build "$build" -j"$(nproc)" --target kvshelf kvshelf_cli _kvshelf ${KVS_CARRY_TARGETS:-} >"$build.build.log" 2>&1 || {
  tail -40 "$build.build.log" >&2
  exit 1
}

ext=$(find "$build/python" -maxdepth 2 -name "_kvshelf.cpython-$("$py" -c 'import sys; print("%d%d" % sys.version_info[:2])')-*.so" | head -1)
[ -n "$ext" ] || { echo "prepare_carry: extension not built" >&2; exit 1; }

# Additive: what others put in .carry (bench/connector_gpu.sh --prepare: test
# programs, bench/connector) stays; only our parts are replaced.
rm -rf "$carry/python"
mkdir -p "$carry/bin" "$carry/lib" "$carry/python/kvshelf/bin"
cp "$root"/python/kvshelf/*.py "$carry/python/kvshelf/"
cp "$ext" "$carry/python/kvshelf/"
cp "$build/bin/kvshelf" "$carry/python/kvshelf/bin/kvshelf"
cp "$build/bin/kvshelf" "$carry/bin/kvshelf"
cp -P "$build"/libkvshelf.so* "$carry/lib/"
for f in "$@"; do
  if [ -x "$f" ] && ! [[ $(basename "$f") == *.so* ]]; then cp "$f" "$carry/bin/"; else cp "$f" "$carry/lib/"; fi
done

# Shared libraries needed by everything carried, minus glibc and the compiler
# runtime (present on every Linux) and the CUDA driver (the GPU machine's own).
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|libresolv|libutil\.so|libanl|libgcc_s|libstdc\+\+|libcuda\.so|libnvidia)'
# (and the GPU test programs put in $carry/tests: they need libcmocka)
elfs=$(find "$carry/bin" "$carry/lib" "$carry/python" $([ -d "$carry/tests" ] && echo "$carry/tests") \
  -type f \( -perm -u+x -o -name '*.so*' \))
for e in $elfs; do
  LD_LIBRARY_PATH=$carry/lib ldd "$e" 2>/dev/null | awk '/=> \//{print $1, $3}'
done | sort -u | while read -r name path; do
  [[ $name =~ $skip ]] && continue
  [ -e "$carry/lib/$name" ] || cp -L "$path" "$carry/lib/$name"
done
chmod -R u+w "$carry"

# The carried files must run on an older glibc than this one where possible.
maxglibc=$(find "$carry" -type f \( -perm -u+x -o -name '*.so*' \) -exec objdump -T {} + 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)

{
  echo "built: $(date -u +%FT%TZ) on $(uname -n) ($(. /etc/os-release; echo "$PRETTY_NAME"), $(ldd --version | head -1))"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null)$(git -C "$root" diff --quiet HEAD -- src include python tools CMakeLists.txt 2>/dev/null || echo ' + uncommitted changes')"
  echo "python: $("$py" -c 'import platform; print(platform.python_version())') ($py)"
  echo "cuda: $(nvcc --version 2>/dev/null | tail -1), sm_90"
  echo "newest glibc symbol needed: $maxglibc"
  echo "files:"
  (cd "$carry" && find . -type f ! -name MANIFEST | sort | while read -r f; do
    printf '  %s %s\n' "$(sha256sum "$f" | cut -c1-16)" "$f"; done)
} >"$carry/MANIFEST"

# Smoke test here, with only the carried files.
env -u KVSHELF_BIN LD_LIBRARY_PATH="$carry/lib" PYTHONPATH="$carry/python" "$py" -c '
import kvshelf, os
assert os.environ["KVSHELF_BIN"].startswith(os.environ["PYTHONPATH"]), os.environ["KVSHELF_BIN"]
print("prepare_carry: import kvshelf", kvshelf.__version__, "OK from", os.path.dirname(kvshelf.__file__))
'
LD_LIBRARY_PATH="$carry/lib" "$carry/bin/kvshelf" --help >/dev/null
echo "prepare_carry: $(du -sh "$carry" | cut -f1) in $carry (newest glibc symbol: $maxglibc); see $carry/MANIFEST"

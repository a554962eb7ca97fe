#!/usr/bin/env bash
# Builds every libFuzzer target (tests/fuzz/fuzz_*.c) with clang in build-fuzz/
# and runs each one briefly. Fails if any target crashes, leaks, hits
# undefined behaviour or times out.
#
#   scripts/fuzz.sh [--seconds N | --runs N] [--target NAME]...
#                   [--build-dir DIR] [--keep-corpus] [--gen-seeds]
#
#   --seconds N    run each target N seconds (default 30)
#   --runs N       run each target N inputs instead
#   --target NAME  only this target (repeatable), e.g. fuzz_frame
#   --build-dir D  build directory (default build-fuzz)
#   --keep-corpus  keep what each run discovers in D/corpus/<target> (default:
#                  start from the seeds each time)
#   --gen-seeds    (re)write the generated seeds of fuzz_frame and
#                  fuzz_metadata_http into tests/fuzz/seeds/ and exit
#
# Seeds: tests/fuzz/seeds/<target>/ (kept in git) is read-only input; new
# inputs go to D/corpus/<target>; crashes go to D/artifacts/.
# Reproduce a crash: D/<target> D/artifacts/<target>-crash-...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SECONDS_EACH=30
RUNS=""
BUILD=build-fuzz
KEEP=0
GEN_ONLY=0
TARGETS=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="${2:?--seconds needs a value}"; RUNS=""; shift 2 ;;
    --runs) RUNS="${2:?--runs needs a value}"; shift 2 ;;
    --target) TARGETS+=("${2:?--target needs a value}"); shift 2 ;;
    --build-dir) BUILD="${2:?--build-dir needs a value}"; shift 2 ;;
    --keep-corpus) KEEP=1; shift ;;
    --gen-seeds) GEN_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "fuzz.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$SECONDS_EACH" in ''|*[!0-9]*) echo "fuzz.sh: --seconds must be a number" >&2; exit 2 ;; esac
case "$RUNS" in *[!0-9]*) echo "fuzz.sh: --runs must be a number" >&2; exit 2 ;; esac

# ---- seed generation (deterministic; Python 3) ----
gen_seeds() {
  python3 - "$ROOT/tests/fuzz/seeds" <<'PY'
import os, struct, sys
root = sys.argv[1]

def frame(t, body, resp=0, status=0, req=1):
    return struct.pack('<IHHIiQ', 0x3153564B, t, 1 if resp else 0, len(body), status, req) + body
def u8(v): return struct.pack('<B', v)
def u32(v): return struct.pack('<I', v)
def i32(v): return struct.pack('<i', v)
def u64(v): return struct.pack('<Q', v)
def bts(b): return u32(len(b)) + b
def s(x): return bts(x.encode())
hid = bytes(range(16)); auth = bytes(range(32)); nonce = bytes(range(100, 116))
keys = [b'k1', b'model/rank0/' + bytes(range(32)), b'x' * 256]

F = {
 'challenge': frame(1, u32(1) + nonce),
 'hello_req': frame(2, u32(1) + u32(1) + u64(1234) + u32(1000) + s('host-a') + hid + auth),
 'hello_resp': frame(2, u64(7) + u32(10000) + u32(5000), resp=1),
 'heartbeat': frame(3, u64(7)) + frame(3, b'', resp=1, status=-3),
 'mount': frame(4, u64(7) + u64(1 << 30) + s('kvshelf-1000-42-0') + s('127.0.0.1:40000') + hid)
          + frame(4, u32(3), resp=1),
 'unmount': frame(5, u64(7) + u32(3)) + frame(5, b'', resp=1),
 'put_start': frame(6, u64(7) + u32(len(keys)) + b''.join(bts(k) + u64(4096) for k in keys))
              + frame(6, u32(2) + i32(0) + u32(1) + u64(0) + u64(9) + i32(-4) + u32(0) + u64(0) + u64(0), resp=1),
 'put_end': frame(7, u64(7) + u32(2) + bts(b'a') + u64(9) + u8(1) + bts(b'b') + u64(10) + u8(0))
            + frame(7, u32(2) + i32(0) + i32(-3), resp=1),
 'get': frame(8, u64(7) + u32(2) + bts(b'a') + bts(b'b'))
        + frame(8, u32(2) + i32(0) + u64(4096) + u32(1) + u64(8192) + u64(9) + u64(77)
                + i32(-3) + u64(0) + u32(0) + u64(0) + u64(0) + u64(0), resp=1),
 'release': frame(9, u64(7) + u32(3) + u64(1) + u64(2) + u64(3)) + frame(9, b'', resp=1),
 'exists': frame(10, u32(3) + bts(b'a') + bts(b'b') + bts(b'c')) + frame(10, u32(3) + b'\x05', resp=1),
 'remove': frame(11, u32(1) + bts(b'a')) + frame(11, u32(1) + i32(0), resp=1),
 'segments': frame(12, b'') + frame(12, u32(1) + u32(1) + u64(1 << 30) + u64(4096) + s('kvshelf-1-2-3')
                                  + s('10.0.0.2:40000') + hid + u64(7), resp=1),
 'stats': frame(13, b'') + frame(13, s('{"segments":1,"objects":0}'), resp=1),
 'shutdown': frame(14, b'') + frame(14, b'', resp=1),
 't_read': frame(32, u32(1) + u64(4096) + u64(16)) + frame(32, bytes(range(16)), resp=1),
 't_write': frame(33, u32(1) + u64(0) + u64(8) + b'ABCDEFGH') + frame(33, b'', resp=1),
 'bad_magic': b'XXXX' + frame(3, u64(1))[4:],
 'bad_type': frame(99, b''),
 'too_long': struct.pack('<IHHIiQ', 0x3153564B, 3, 0, 0xffffffff, 0, 1),
 'str_nul': frame(13, bts(b'a\x00b'), resp=1),
 'truncated': frame(6, u64(7) + u32(5) + bts(b'a'))[:-1],
 'trailing': frame(3, u64(7) + b'\x00'),
}
d = os.path.join(root, 'fuzz_frame'); os.makedirs(d, exist_ok=True)
for name, data in F.items():
    open(os.path.join(d, name), 'wb').write(data)
allf = b''.join(v for k, v in F.items() if not k.startswith(('bad', 'too', 'trunc')))
open(os.path.join(d, 'all_frames'), 'wb').write(allf)

# fuzz_metadata_http: handler mode = b0 (low nibble != 0xf), then ops of
# [op][keylen][key][bodylen][body]; op bits 0-2: GET PUT DELETE PUT GET POST "" get; bit 3: no key.
def op(m, key, body=b''):
    return bytes([m, len(key)]) + key + bytes([len(body)]) + body
GET, PUT, DEL, POST = 0, 1, 2, 5
H = {
 'put_get_del': b'\x00' + op(PUT, b'k', b'{"a":1}') + op(GET, b'k') + op(DEL, b'k') + op(GET, b'k') + op(DEL, b'k'),
 'missing_key': b'\x00' + op(GET | 8, b'') + op(PUT, b'  ', b'x') + op(POST, b'k'),
 'rpc_meta': b'\x00' + op(PUT, b'mooncake/rpc_meta/a', b'1') + op(PUT, b'mooncake/rpc_meta/a', b'1')
             + op(PUT, b'mooncake/rpc_meta/a', b'2'),
 'limits': b'\x00' + b''.join(op(PUT, b'key%d' % i, b'v' * 40) for i in range(10)) + op(PUT, b'k' * 17, b'x')
           + op(PUT, b'big', b'z' * 65),
 'trim': b'\x00' + op(PUT, b' \tk \n', b'v') + op(GET, b'k'),
}
RAW = {
 'raw_put': b'PUT /metadata?key=a HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{"a":1}',
 'raw_get': b'GET /metadata?key=a HTTP/1.1\r\nHost: x\r\n\r\n',
 'raw_pipeline': b'PUT /metadata?key=b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx'
                 b'GET /metadata?key=b HTTP/1.1\r\nHost: x\r\n\r\nDELETE /metadata?key=b HTTP/1.1\r\nHost: x\r\n\r\n',
 'raw_chunked': b'PUT /metadata?key=c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n',
 'raw_escaped': b'GET /metadata?key=%41%20b&key=2 HTTP/1.1\r\nHost: x\r\n\r\n',
 'raw_nokey': b'GET /metadata HTTP/1.0\r\n\r\n',
 'raw_toolarge': b'PUT /metadata?key=d HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n',
 'raw_other_path': b'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n',
 'raw_expect': b'PUT /metadata?key=e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi',
}
d = os.path.join(root, 'fuzz_metadata_http'); os.makedirs(d, exist_ok=True)
for name, data in H.items():
    open(os.path.join(d, name), 'wb').write(data)
for name, data in RAW.items():
    open(os.path.join(d, name), 'wb').write(b'\x0f' + data)
print("fuzz.sh: seeds written under", root)
PY
}

if [ "$GEN_ONLY" = 1 ]; then gen_seeds; exit 0; fi
for t in fuzz_frame fuzz_metadata_http; do
  [ -d "tests/fuzz/seeds/$t" ] || { gen_seeds; break; }
done

# ---- build ----
command -v clang >/dev/null || { echo "fuzz.sh: clang is required (scripts/deps.sh installs it)" >&2; exit 1; }
if [ ${#TARGETS[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.c; do
    [ -e "$f" ] || continue
    n="$(basename "$f" .c)"
    TARGETS+=("$n")
  done
fi
[ ${#TARGETS[@]} -gt 0 ] || { echo "fuzz.sh: no tests/fuzz/fuzz_*.c targets" >&2; exit 1; }

if [ ! -f "$BUILD/CMakeCache.txt" ] || ! grep -q '^KVS_FUZZ:BOOL=ON' "$BUILD/CMakeCache.txt"; then
  CC=clang cmake -S . -B "$BUILD" -DKVS_FUZZ=ON -DKVS_TESTS=OFF -DKVS_WITH_CUDA=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD.configure.log" 2>&1 || {
    cat "$BUILD.configure.log" >&2; echo "fuzz.sh: cmake configure failed" >&2; exit 1; }
  rm -f "$BUILD.configure.log"
fi
cmake --build "$BUILD" -j"$(nproc)" --target "${TARGETS[@]}" >/dev/null 2>"$BUILD/build-errors.log" || {
  cat "$BUILD/build-errors.log" >&2; echo "fuzz.sh: build failed" >&2; exit 1; }

# ---- run ----
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
mkdir -p "$BUILD/artifacts" "$BUILD/logs"
if [ -n "$RUNS" ]; then LIMIT=(-runs="$RUNS"); else LIMIT=(-max_total_time="$SECONDS_EACH"); fi

fail=0
summary=()
for t in "${TARGETS[@]}"; do
  bin="$BUILD/$t"
  [ -x "$bin" ] || bin="$(find "$BUILD" -maxdepth 3 -type f -name "$t" -perm -u+x | head -n1)"
  [ -n "$bin" ] && [ -x "$bin" ] || { echo "fuzz.sh: $t was not built" >&2; fail=1; continue; }
  corpus="$BUILD/corpus/$t"
  [ "$KEEP" = 1 ] || rm -rf "$corpus"
  mkdir -p "$corpus"
  seeds=()
  [ -d "tests/fuzz/seeds/$t" ] && seeds=("tests/fuzz/seeds/$t")
  log="$BUILD/logs/$t.log"
  echo "== $t (${RUNS:+$RUNS runs}${RUNS:-$SECONDS_EACH s})"
  set +e
  "$bin" "${LIMIT[@]}" -timeout=25 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$BUILD/artifacts/$t-" "$corpus" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)"
  if [ "$rc" -ne 0 ]; then
    fail=1
    echo "   FAILED (exit $rc); last lines of $log:"
    tail -n 40 "$log" | sed 's/^/   | /'
    summary+=("$(printf '%-24s FAILED  exit %s, see %s' "$t" "$rc" "$log")")
  else
    summary+=("$(printf '%-24s ok  %12s execs  %8s exec/s  cov %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}")")
  fi
done

echo
echo "fuzz summary:"
for l in "${summary[@]}"; do echo "  $l"; done
exit $fail

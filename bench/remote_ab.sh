#!/usr/bin/env bash
# Side-by-side A/B of whole kvshelf binaries on remote gets (the client maps
# nothing: KVSHELF_NO_SHM=1, every byte crosses the node's transfer server).
#
#   bench/remote_ab.sh NAME=PATH/kvshelf NAME=PATH/kvshelf ...
#   env: REPS (8), BATCH (1), SIZE (1M), COUNT (256), DURATION (0.7 s)
#
# Each binary gets its own master and node (loopback, free ports); the
# binaries then take turns, REPS times, each turn one `kvshelf bench --mode
# put,get,get` of that binary (the second get pass counts). Prints one line
# per turn and a table of medians (p50 latency of a get call, GB/s, gets
# whose bytes started before the master answered). Everything is stopped
# at the end.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
T=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"' EXIT
names=()
for nb in "$@"; do
  n=${nb%%=*}; bin=${nb#*=}
  [ -x "$bin" ] || { echo "remote_ab: $bin is not executable" >&2; exit 2; }
  names+=("$n"); mkdir -p "$T/$n"; echo "$bin" > "$T/$n/bin"
  KVSHELF_RUNTIME_DIR=$T/$n/rt "$bin" master --listen 127.0.0.1:0 --http off \
    --port-file "$T/$n/port" > "$T/$n/m.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$T/$n/port" ] && break; sleep 0.1; done
  addr=127.0.0.1:$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['rpc'])" "$T/$n/port")
  KVSHELF_RUNTIME_DIR=$T/$n/rt "$bin" node --master "$addr" --segment-size 1GiB \
    > "$T/$n/n.log" 2>&1 &
  pids+=($!)
  echo "$addr" > "$T/$n/addr"
done
sleep 1.5
for rep in $(seq "${REPS:-8}"); do
  for n in "${names[@]}"; do
    KVSHELF_NO_SHM=1 KVSHELF_RUNTIME_DIR=$T/$n/rt "$(cat "$T/$n/bin")" bench \
      --master "$(cat "$T/$n/addr")" --json --quiet --mode put,get,get --sizes "${SIZE:-1M}" \
      --count "${COUNT:-256}" --duration "${DURATION:-0.7}" --batch "${BATCH:-1}" \
      --prefix "ab$rep" > "$T/$n/r$rep.json"
    python3 - "$T/$n/r$rep.json" "$rep" "$n" <<'PY' | tee -a "$T/all.txt"
import json, sys
d = json.load(open(sys.argv[1]))
r = [x for x in d["results"] if x["mode"] == "get"][-1]
print("rep %s %s p50_us %.0f gb_per_s %.3f early_kept %d gets %d ok %d miss %d" % (
    sys.argv[2], sys.argv[3], r["lat_us"]["p50"], r["gb_per_s"],
    d["counters"]["early_kept"], d["counters"]["gets"], r["ok"], r["miss"]))
PY
  done
done
python3 - "$T/all.txt" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[2], []).append((float(f[4]), float(f[6]), int(f[8]) / max(int(f[10]), 1)))
print("\n| binary | turns | get p50 (us), median | GB/s, median | early reads kept |")
print("|---|---|---|---|---|")
for n, v in rows.items():
    print("| %s | %d | %.0f | %.2f | %.0f%% |" % (n, len(v), statistics.median(x[0] for x in v),
          statistics.median(x[1] for x in v), 100 * statistics.median(x[2] for x in v)))
PY

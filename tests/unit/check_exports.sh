#!/usr/bin/env bash
# Checks that libkvshelf.so exports exactly the functions declared in the
# public headers (include/kvshelf/*.h): nothing internal leaks out, nothing
# public is missing. Run by ctest: check_exports.sh <libkvshelf.so> <include dir>
set -euo pipefail
lib=$1 inc=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for h in "$inc"/kvshelf/*.h; do echo "#include \"$h\""; done > "$tmp/all.h"
# declarations after preprocessing (comments gone): every kvs_name( is a function
${CC:-cc} -E -P -I"$inc" -D_GNU_SOURCE "$tmp/all.h" | tr '\n' ' ' |
  grep -oE 'kvs_[a-z0-9_]+ *\(' | tr -d ' (' | sort -u > "$tmp/public"
nm -D --defined-only "$lib" | awk '$2 ~ /^[TWDBRiu]$/ {print $3}' | sed 's/@.*//' | sort -u > "$tmp/exported"
extra=$(comm -13 "$tmp/public" "$tmp/exported")
missing=$(comm -23 "$tmp/public" "$tmp/exported")
np=$(wc -l < "$tmp/public")
ne=$(wc -l < "$tmp/exported")
echo "public functions in headers: $np; symbols exported by $lib: $ne"
[ "$np" -gt 20 ] || { echo "FAIL: found only $np public functions (header parse broken?)"; exit 1; }
if [ -n "$extra" ]; then echo "FAIL: exported but not public:"; echo "$extra"; fi
if [ -n "$missing" ]; then echo "FAIL: public but not exported:"; echo "$missing"; fi
[ -z "$extra" ] && [ -z "$missing" ]

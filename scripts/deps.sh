#!/usr/bin/env bash
# Installs what kvshelf needs to build and test, if missing (idempotent).
# Debian packages via apt-get; Python test tools via pip (into the user's Python).
set -euo pipefail
pkgs=(build-essential cmake pkg-config clang libclang-rt-14-dev
      libxxhash-dev libcjson-dev libmicrohttpd-dev libcurl4-openssl-dev libssl-dev libcmocka-dev
      nftables    # nftables: the network partition of tests/integration/test_faults.py
      etcd-server etcd-client  # a real etcd: master failover (tests/integration/test_failover.py)
      libibverbs1)  # libibverbs1: Mooncake's wheel loads it (tests/integration/mooncake_env.py)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "${1:-}" = "--python" ]; then
  # torch (CPU use; the PyPI wheel is the CUDA build, ~3 GB) for the Python package tests
  python3 -m pip install -q --disable-pip-version-check pytest numpy torch scikit-build-core
fi

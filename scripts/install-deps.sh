#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build, run and test meshlb,
# builds the BPF objects and installs the package (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  clang llvm libbpf-dev libbpf1 bpftool make iproute2 nftables
  curl wrk apache2-utils haproxy tshark python3-scapy
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check -e '.[test,fast]'
make -s all

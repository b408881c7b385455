#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build, run and test meshlb,
# builds the BPF objects and installs the package (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# bird2: the BGP speaker of the mixes (announce mode bgp, managed) and of the lab's router
# (lab up --routing bgp); frr: the other speaker the external mode is tested with
APT_PACKAGES=(
  clang llvm libbpf-dev libbpf1 bpftool make iproute2 nftables
  curl wrk apache2-utils haproxy tshark python3-scapy
  bird2 frr
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
pip_flags=(-q --disable-pip-version-check)
# Debian/Ubuntu's own python3 refuses system-wide pip installs (PEP 668); meshlb runs as
# root on the host it balances, so install into that interpreter anyway
if "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
  pip_flags+=(--break-system-packages)
  command -v pip3 >/dev/null || apt-get install -y -qq python3-pip >/dev/null
fi
"$PY" -m pip install "${pip_flags[@]}" -e '.[test,fast]'
make -s all

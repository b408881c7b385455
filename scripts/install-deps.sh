#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build, run and test meshlb,
# builds the BPF objects and installs the package (editable) with its test extras.
set -euo pipefail
# root does it directly; anyone else through sudo
if [ "$(id -u)" -ne 0 ]; then exec sudo -- bash "$0" "$@"; fi
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # build: the data plane (clang, bpftool, make), a wheel in a fresh venv, a clone of the tree
  clang llvm libbpf-dev libbpf1 bpftool make git python3-venv
  # run and test: labs, traffic, checks of the operator files (systemd-analyze, promtool)
  iproute2 nftables util-linux curl wrk apache2-utils haproxy tshark python3-scapy systemd prometheus
  # announcement: BIRD, the BGP speaker of the mixes (mode bgp, managed) and of the lab's
  # router; FRR, the other speaker the external mode is tested with
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
  # the tests want promtool only: a Prometheus server this install started goes again
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
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

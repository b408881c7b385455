#!/usr/bin/env bash
# Fresh Debian/Ubuntu machine -> a 3-mix meshlb lab in network namespaces, balancing.
# Leaves the lab up; remove it with: meshlb lab down
set -euo pipefail
# root does it directly; anyone else through sudo
if [ "$(id -u)" -ne 0 ]; then exec sudo -- bash "$0" "$@"; fi
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
meshlb lab down >/dev/null 2>&1 || true
meshlb lab up --nodes 3
echo
echo "== 9 requests from the client to the dr VIP 198.19.0.1 (the lab router's ECMP spreads them over the mixes)"
for i in $(seq 1 9); do meshlb lab exec client -- curl -s --max-time 2 http://198.19.0.1/; done
echo
echo "== 9 requests to the nat VIP 198.19.0.2"
for i in $(seq 1 9); do meshlb lab exec client -- curl -s --max-time 2 http://198.19.0.2/; done
echo
echo "== meshlb members, as mix1 sees the cluster"
meshlb lab exec mix1 -- meshlb members
echo
echo "lab is up: try 'meshlb lab exec client -- ab -c 100 -n 5000 http://198.19.0.1/'; remove it with 'meshlb lab down'"

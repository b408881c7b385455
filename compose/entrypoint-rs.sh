#!/bin/sh
# A real server: the demo application and no meshlb, a backend the mixes balance to
# (the `servers` of the VIPs in cluster.toml), as `meshlb lab up --servers` makes them.
# For the dr VIPs it is an LVS-DR real server: the VIP on its loopback, and ARP for it
# never answered nor used as a source (arp_ignore=1, arp_announce=2, set as sysctls by
# docker-compose.yml), so that only the mixes' forwarding brings it the VIP's packets.
#
# Environment (set by docker-compose.yml):
#   MESHLB_DR_VIPS  space-separated dr VIP addresses
#   APP_PORT        port of the demo application (default 80)
set -eu

# Full checksums on the wire: see entrypoint-mix.sh.
ethtool -K eth0 tx off >/dev/null 2>&1 || echo "entrypoint-rs: cannot turn off tx checksum offload on eth0" >&2

for vip in ${MESHLB_DR_VIPS:-}; do
  ip addr add "$vip/32" dev lo
done

exec python3 -m meshlb.lab.app "$(hostname)" "${APP_PORT:-80}"

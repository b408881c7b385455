#!/bin/sh
# The router container: the client's next hop for every VIP, spreading flows over the
# mixes with an ECMP route, then idling. Its sysctls (docker-compose.yml) turn on
# forwarding and hash each packet's 5-tuple (fib_multipath_hash_policy 3 with the
# port fields): every packet of a flow takes the same mix, whatever hash the sender
# left in the packet.
#
# Environment (set by docker-compose.yml):
#   MESHLB_VIPS    space-separated VIP addresses
#   MESHLB_MIXES   space-separated mix addresses (the next hops)
set -eu

# Full checksums on the wire: see entrypoint-mix.sh.
ethtool -K eth0 tx off >/dev/null 2>&1 || echo "entrypoint-router: cannot turn off tx checksum offload on eth0" >&2

for vip in ${MESHLB_VIPS:-}; do
  set --
  for mix in ${MESHLB_MIXES:-}; do
    set -- "$@" nexthop via "$mix" dev eth0
  done
  ip route replace "$vip/32" "$@"
done

exec sleep infinity

#!/bin/sh
# The client container: routes each VIP over all mixes, as a router doing ECMP would,
# then idles; tests and humans run curl/ab in it with `docker exec`.
#
# Environment (set by docker-compose.yml):
#   MESHLB_VIPS    space-separated VIP addresses
#   MESHLB_MIXES   space-separated mix addresses (the next hops)
# Hashing on the 5-tuple (fib_multipath_hash_policy=1) comes from the compose file's
# sysctls, so each new connection may take another mix.
set -eu

# Full checksums on the wire: see entrypoint-mix.sh.
ethtool -K eth0 tx off >/dev/null 2>&1 || echo "entrypoint-client: cannot turn off tx checksum offload on eth0" >&2

for vip in ${MESHLB_VIPS:-}; do
  set --
  for mix in ${MESHLB_MIXES:-}; do
    set -- "$@" nexthop via "$mix" dev eth0
  done
  ip route replace "$vip/32" "$@"
done

exec sleep infinity

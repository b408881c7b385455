#!/bin/sh
# The client container: routes each VIP through the router container, then idles;
# tests and humans run curl/ab in it with `docker exec`. (Not ECMP here: Linux hashes
# a local TCP flow by its socket's random txhash, redrawn after a retransmission
# timeout, so one connection could change mix mid-flow.)
#
# Environment (set by docker-compose.yml):
#   MESHLB_VIPS    space-separated VIP addresses
#   MESHLB_ROUTER  the router's address
set -eu

# Full checksums on the wire: see entrypoint-mix.sh.
ethtool -K eth0 tx off >/dev/null 2>&1 || echo "entrypoint-client: cannot turn off tx checksum offload on eth0" >&2

for vip in ${MESHLB_VIPS:-}; do
  ip route replace "$vip/32" via "$MESHLB_ROUTER" dev eth0
done

exec sleep infinity

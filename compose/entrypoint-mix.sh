#!/bin/sh
# A mix container: the demo application and the meshlb agent.
#
# Environment (set by docker-compose.yml):
#   MESHLB_PEERS   comma-separated gossip seeds ("host:port"): the other mixes
#   MESHLB_CONFIG  shared cluster file (default /etc/meshlb/cluster.toml)
#   APP_PORT       port of the demo application (default 80)
set -eu

SHARED=${MESHLB_CONFIG:-/etc/meshlb/cluster.toml}
CONFIG=/run/meshlb-compose/cluster.toml
KEY=/etc/meshlb/key/cluster.key
NAME=$(hostname)

# A container's /sys is a fresh sysfs without bpffs; the agent pins its maps and links
# there. This instance belongs to the container and goes away with it.
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != "bpf_fs" ]; then
  mount -t bpf bpf /sys/fs/bpf
fi

# The agent also reads socket closes from a sock_ops program on a cgroup v2 directory
# (conntrack.sockops_cgroup). Docker on a host with cgroup v1 mounts no cgroup v2
# hierarchy in the container; mount one (this container's view of it).
if ! grep -q ' - cgroup2 ' /proc/self/mountinfo; then
  mkdir -p /run/meshlb-cgroup2
  mount -t cgroup2 cgroup2 /run/meshlb-cgroup2 ||
    echo "entrypoint-mix: no cgroup v2: socket closes come from the tracepoint alone" >&2
fi

# Docker mounts /proc/sys read-only in unprivileged containers; the agent sets the ARP
# knobs of its VIPs (per network namespace, so this container's own) and reserves its
# SNAT ports there.
if ! touch /proc/sys/net/ipv4/conf/all/arp_ignore 2>/dev/null; then
  mount -o remount,rw /proc/sys
fi

# The veth hands locally sent TCP segments on with only a partial checksum, which the
# receiving end trusts; once an XDP program has rewritten and bounced a frame that
# promise no longer holds. Full checksums, as a real NIC would deliver them.
ethtool -K eth0 tx off >/dev/null 2>&1 || echo "entrypoint-mix: cannot turn off tx checksum offload on eth0" >&2

# The key is written by the one-shot keygen service; compose orders it first, and this
# wait covers compose implementations that only order container starts.
i=0
while [ ! -s "$KEY" ]; do
  i=$((i + 1))
  if [ "$i" -gt 100 ]; then
    echo "entrypoint-mix: no cluster key at $KEY" >&2
    exit 1
  fi
  sleep 0.1
done

# This mix's cluster file: the shared one with its own seeds in place of "peers = []".
mkdir -p "$(dirname "$CONFIG")"
peers=$(printf '%s' "${MESHLB_PEERS:-}" | sed -e 's/[^,][^,]*/"&"/g' -e 's/,/, /g')
sed -e "s/^peers = \[\]\$/peers = [$peers]/" "$SHARED" > "$CONFIG"

python3 -m meshlb.lab.app "$NAME" "${APP_PORT:-80}" &

exec meshlb join --config "$CONFIG" --name "$NAME"

"""The gossip driver of one agent, built from its configuration.

``meshlb.cluster`` knows nothing of the cluster file: this is where its fields become
the transport's, the protocol's and the wire's settings.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from meshlb.cluster.driver import GossipDriver
from meshlb.cluster.keyring import Keyring
from meshlb.cluster.node import Event, MemberMeta
from meshlb.cluster.protocol_config import ProtocolConfig
from meshlb.cluster.ratelimit import RateLimiter
from meshlb.cluster.transport import TransportConfig, parse_peer
from meshlb.cluster.wire import Wire
from meshlb.config import Config, load_key_ring


def build_driver(cfg: Config, *, name: str, address: str | None = None, meta: MemberMeta | None = None,
                 on_event: Callable[[Event], object] | None = None, keys: Sequence[bytes] | None = None,
                 **kwargs: Any) -> GossipDriver:
    """A driver (not started) for the agent. ``address`` is the advertised address
    (``host`` or ``host:port``); ``keys`` the key ring (first key seals), read from
    ``cluster.key_file`` when not given; ``kwargs`` go to :class:`GossipDriver`."""
    node, cl = cfg.node, cfg.cluster
    if keys is None:
        keys = load_key_ring(cl.key_file, cfg.source)
    advertise = advertise_port = None
    if address:
        advertise, advertise_port = parse_peer(address, node.bind.port)
        if advertise_port == node.bind.port:
            advertise_port = None
    group = broadcast = group_port = None
    if cl.discovery == "multicast":
        group, group_port = cl.multicast_group.host, cl.multicast_group.port
    elif cl.discovery == "broadcast":
        broadcast = cl.broadcast_address
    transport = TransportConfig(
        mode=cl.discovery, bind=node.bind.host, port=node.bind.port, advertise=advertise,
        advertise_port=advertise_port, interface=node.iface, group=group, group_port=group_port,
        broadcast=broadcast, ttl=cl.multicast_ttl,
    )
    timings = dict(cl.timings)
    timings.setdefault("max_datagram", cl.max_datagram)
    protocol = ProtocolConfig.preset(cl.preset, **timings)
    # The boot time in milliseconds: each restart starts above the last one, so the
    # replay windows and the eviction numbering of the old life never clash.
    boot = time.time_ns() // 1_000_000
    # Per source address, checked before any decryption. A member in an eviction burst
    # sends at most gossip_max_datagrams per gossip round to one peer; the bucket leaves
    # it ample room and caps what a flood can cost us.
    per_round = protocol.gossip_max_datagrams * 2
    rate = max(200.0, per_round / protocol.gossip_interval * 4)
    wire = Wire(label=cl.label, keyring=Keyring(keys[0], keys[1:]), sender=name, epoch=boot,
                max_datagram=cl.max_datagram, rate_limiter=RateLimiter(rate=rate, burst=rate * 2))
    kwargs.setdefault("incarnation", boot)
    return GossipDriver(name=name, wire=wire, protocol=protocol, transport=transport,
                        peers=[str(p) for p in cl.peers], meta=meta, on_event=on_event, **kwargs)

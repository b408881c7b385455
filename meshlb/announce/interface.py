"""The one interface the agent drives, whatever the announcement mode.

The agent tells an :class:`Announcer` which VIPs this mix can forward now (its data plane
is attached and each VIP's table installed) together with what it reads of the cluster
(:class:`ClusterView`); the announcer makes the network send this mix traffic for exactly
those VIPs, by whatever its mode does: a route per VIP for the BGP speaker, the VIP's
address on the data interface (and gratuitous ARP / unsolicited NA) for the L2 owner.

The announcer reads the cluster's view and never owns it: what it needs gossiped (the
L2 claims in :attr:`Announcer.owned`) the agent puts into its member metadata. Failures
of the network side (a speaker that will not start, a neighbour that refuses) are
logged, shown in :meth:`Announcer.status` and retried; no method raises into the agent
for them, since forwarding must carry on whatever the routers do.
"""
from __future__ import annotations

import abc
import ipaddress
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ClusterView:
    """The part of the agreed cluster state an announcer reads.

    ``ready``: for each member the agent holds alive (not suspect, dead or left),
    the VIP addresses that member says its data plane forwards (gossiped in its
    metadata; empty while it leaves). ``claims``: for each member, the VIP addresses it
    says it owns on its segment (L2). The local member may be left out of both: the
    announcer knows its own.
    """

    ready: Mapping[str, AbstractSet[str]] = field(default_factory=dict)
    claims: Mapping[str, AbstractSet[str]] = field(default_factory=dict)


EMPTY_VIEW = ClusterView()


def vip_address(key: str) -> str:
    """The address of a VIP key (``10.0.0.1:80/tcp``, ``[fd00::1]:80/tcp``) or of a bare
    address, in canonical form."""
    host = key.rsplit("/", 1)[0] if "/" in key else key
    if host.startswith("["):
        host = host[1:host.index("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return str(ipaddress.ip_address(host))


def ready_addresses(configured: Iterable[str], forwardable: AbstractSet[str]) -> frozenset[str]:
    """VIP addresses to announce: those whose every configured VIP (address, port,
    protocol) this mix can forward. Traffic for an address reaches the mix whatever its
    port, so one VIP of the address without a table would meet resets."""
    by_address: dict[str, bool] = {}
    for key in configured:
        addr = vip_address(key)
        by_address[addr] = by_address.get(addr, True) and key in forwardable
    return frozenset(a for a, ok in by_address.items() if ok)


class Announcer(abc.ABC):
    """What the agent calls. Every coroutine returns once the kernel state it changes
    (routes, addresses) is in place; waiting on the network (gratuitous ARP repeats,
    the speaker's sessions) happens in the announcer's own tasks."""

    mode: str = ""

    def __init__(self, vips: Iterable[str] = ()) -> None:
        self.vips: tuple[str, ...] = tuple(vips)

    def set_vips(self, vips: Iterable[str]) -> None:
        """The configured VIP keys (at start and on reload); takes effect at the next
        :meth:`update`."""
        self.vips = tuple(vips)

    async def start(self) -> None:
        """Start or adopt what the mode needs (a speaker, a raw socket). Announces
        nothing: a restarted agent's start leaves announced VIPs as they are, and the
        first :meth:`update` after its data plane is adopted confirms them."""

    @abc.abstractmethod
    async def update(self, forwardable: AbstractSet[str], view: ClusterView = EMPTY_VIEW) -> None:
        """This mix can forward exactly the VIP keys in ``forwardable`` now; announce
        those (addresses all of whose configured VIPs are in it), withdraw the rest."""

    @abc.abstractmethod
    async def withdraw_all(self) -> None:
        """Stop attracting traffic (leave, SIGTERM, a detached data plane), before the
        drain: BGP withdraws every route at once; L2 hands each owned VIP over and
        keeps answering for it until another member's claim is seen in an update."""

    @abc.abstractmethod
    async def stop(self, keep: bool) -> None:
        """End the announcer's tasks. ``keep``: leave what is announced as it is (the
        agent is being restarted in place and its data plane keeps forwarding);
        otherwise withdraw everything and stop a managed speaker."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """Plain data for ``meshlb members``, the control socket and the metrics."""

    @property
    def owned(self) -> frozenset[str]:
        """VIP addresses this mix claims on its segment (L2), for its member metadata."""
        return frozenset()

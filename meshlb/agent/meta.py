"""This member as the cluster sees it: the metadata it gossips about itself, and the
members whose applications its health checks cover."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshlb.cluster.membership import MemberView
from meshlb.cluster.node import MemberMeta, Status
from meshlb.config import HealthConfig, VipConfig
from meshlb.health import HealthChecker

DEFAULT_APP_PORT = 80  # no VIP and no health.app_port: something to check all the same


def member_meta(name: str, vips: Iterable[VipConfig], digest: str, addresses: Sequence[str], *,
                draining: bool, health: HealthChecker | None) -> MemberMeta:
    """A draining member serves nothing new: weight 0 and its app reported down."""
    return MemberMeta(
        vips=tuple(v.key for v in vips),
        weight=0 if draining else 100,
        app_healthy=not draining and app_healthy(name, health),
        table_digest=digest,
        observations=observations(name, health),
        addresses=tuple(addresses),
    )


def app_healthy(name: str, health: HealthChecker | None) -> bool:
    r = health.result(name) if health is not None else None
    # no verdict yet (a restart): keep serving as before rather than announce the
    # app down and move live flows' new neighbours away for a check interval
    return True if r is None or not r.checks else r.ok


def observations(name: str, health: HealthChecker | None) -> dict[str, bool]:
    """Only failures: the usable rule counts "down" reports, and a full map of every
    member would not fit a datagram in a large cluster."""
    if health is None:
        return {}
    return {other: False for other, r in health.results().items()
            if other != name and r is not None and not r.ok}


def health_targets(name: str, address: str, cfg: HealthConfig, vips: Sequence[VipConfig],
                   members: Iterable[MemberView]) -> dict[str, tuple[str, int]]:
    """member name -> (address, port) to check: this node's own app, and the live
    members' that ``health.check_peers`` allows."""
    port = cfg.app_port or (vips[0].target_port if vips else DEFAULT_APP_PORT)
    targets = {name: (address, port)}
    peers = cfg.check_peers
    if peers:
        allowed = None if isinstance(peers, bool) else set(peers)
        for m in members:
            if (m.name != name and m.status in (Status.ALIVE, Status.SUSPECT)
                    and (allowed is None or m.name in allowed)):
                targets[m.name] = (m.address[0], port)
    return targets

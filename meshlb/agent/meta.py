"""This member as the cluster sees it: the metadata it gossips about itself, and the
backends its health checks cover (members' applications and the VIPs' real servers)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshlb.backends import server_name
from meshlb.cluster.membership import MemberView
from meshlb.cluster.node import MemberMeta, Status
from meshlb.config import HealthConfig, VipConfig
from meshlb.health import HealthChecker

DEFAULT_APP_PORT = 80  # no VIP and no health.app_port: something to check all the same


def member_meta(name: str, vips: Iterable[VipConfig], digest: str, addresses: Sequence[str], *,
                draining: bool, health: HealthChecker | None, serve: bool = True) -> MemberMeta:
    """A draining member serves nothing new: weight 0 and its app reported down. The
    VIPs it lists are those it serves: none with ``serve`` False (a balancer only),
    else those whose ``members`` admit it."""
    return MemberMeta(
        vips=served_vips(name, vips, serve),
        weight=0 if draining else 100,
        app_healthy=not draining and (not serve or app_healthy(name, health)),
        table_digest=digest,
        observations=observations(name, health),
        addresses=tuple(addresses),
    )


def served_vips(name: str, vips: Iterable[VipConfig], serve: bool = True) -> tuple[str, ...]:
    if not serve:
        return ()
    return tuple(v.key for v in vips if v.members is None or name in v.members)


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
                   members: Iterable[MemberView], *, serve: bool = True) -> dict[str, tuple[str, int]]:
    """backend name -> (address, port) to check: this node's own app (if it serves),
    the live members that serve a VIP and that ``health.check_peers`` allows, and
    every real server of the VIPs (every mix checks them: no other check exists)."""
    port = cfg.app_port or (vips[0].target_port if vips else DEFAULT_APP_PORT)
    targets = {name: (address, port)} if serve and served_vips(name, vips) else {}
    peers = cfg.check_peers
    if peers:
        allowed = None if isinstance(peers, bool) else set(peers)
        for m in members:
            if (m.name != name and m.status in (Status.ALIVE, Status.SUSPECT) and m.meta.vips
                    and (allowed is None or m.name in allowed)):
                targets[m.name] = (m.address[0], port)
    for v in vips:
        for s in v.servers:
            targets[server_name(s.host, s.port)] = (s.host, s.port)
    return targets

"""Which backends a VIP has, and with what weight: one pure function of the cluster file
and the agreed cluster view, so that every mix computes the same sets, hence the same
Maglev tables (meshlb/forwarding.py builds them from what this returns).

A VIP's candidates are

* the members whose metadata says they serve it (a member with ``node.serve = false``
  says it serves nothing), that the VIP's ``members`` admits (``None``: all) and that
  have an address of the VIP's family: named by member name;
* its ``servers``, real servers that run no meshlb: named ``address:port`` (``[v6]:port``),
  which no member name can be (a member name has no colon).

Each candidate's **health** is the cluster's agreed verdict (``health_view``): a member
must be alive, report its own application up and not be reported down by more than half
of the other alive members; a server must not be reported down by more than half of the
alive members (every mix checks every server and gossips only its failures, as for
members). Its **state**: ``draining`` when the cluster's drain map names it (``drained``:
``member:NAME`` or ``server:ADDRESS``), when the file gives it weight 0, or (a member)
when its own metadata says weight 0 (it is leaving); else ``active`` when healthy, else
``down``. The Maglev set is the healthy candidates: active ones with the file's weight,
draining ones with weight 0, which keeps them in the table's index space and gives them
no slot, so new flows avoid them and conntrack keeps established ones where they are.

Nothing here depends on the order in which the view was learnt or on local time.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshlb.cluster.health_view import usable_backends, usable_servers
from meshlb.cluster.membership import MemberView
from meshlb.cluster.messages import Status

__all__ = [
    "Backend", "BackendSet", "ServerSpec", "VipBackends", "MEMBER", "EXTERNAL", "ACTIVE", "DRAINING", "DOWN",
    "backend_sets", "member_address", "server_name", "drain_key", "member_drain_key", "server_drain_key",
    "drain_target", "UnknownBackend",
]

MEMBER = "member"
EXTERNAL = "external"
ACTIVE = "active"
DRAINING = "draining"
DOWN = "down"


class ServerSpec(Protocol):
    """A real server of a VIP (:class:`meshlb.config.HostPort` is one)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class VipBackends(Protocol):
    """What this module reads of a VIP; :class:`meshlb.config.VipConfig` is one."""

    @property
    def key(self) -> str: ...

    @property
    def mode(self) -> str: ...

    @property
    def target_port(self) -> int: ...

    @property
    def members(self) -> tuple[str, ...] | None: ...

    @property
    def servers(self) -> Sequence[ServerSpec]: ...

    @property
    def weights(self) -> tuple[tuple[str, int], ...]: ...


@dataclass(frozen=True)
class Backend:
    name: str  # Maglev name: member name, or "address:port" of a server
    kind: str  # MEMBER or EXTERNAL
    address: str  # where the data plane sends its flows
    port: int  # nat: the port it listens on; dr: 0 (the VIP's port, unchanged)
    weight: int  # the file's weight (default 1)
    healthy: bool
    state: str  # ACTIVE, DRAINING or DOWN

    @property
    def table_weight(self) -> int | None:
        """Its weight in the Maglev table; None: not in the table (unhealthy)."""
        if not self.healthy:
            return None
        return 0 if self.state == DRAINING else self.weight


@dataclass(frozen=True)
class BackendSet:
    vip_key: str
    backends: tuple[Backend, ...]  # every candidate, sorted by name
    # (name, weight) of the healthy candidates, by name: what Maglev is built from
    table_set: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, vip_key: str, backends: tuple[Backend, ...]) -> BackendSet:
        return cls(vip_key, backends, _table_set(backends))

    def chosen(self) -> tuple[tuple[str, int], ...]:
        return self.table_set

    def get(self, name: str) -> Backend | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None


def _table_set(backends: Iterable[Backend]) -> tuple[tuple[str, int], ...]:
    out = []
    for b in backends:
        w = b.table_weight
        if w is not None:
            out.append((b.name, w))
    return tuple(out)


def server_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def member_drain_key(name: str) -> str:
    return f"member:{name}"


def server_drain_key(address: str) -> str:
    return f"server:{address}"


def drain_key(b: Backend) -> str:
    """The drain map's key that drains ``b``: its member name, or its server's address
    (every port of it, in every VIP)."""
    return member_drain_key(b.name) if b.kind == MEMBER else server_drain_key(b.address)


def member_address(m: MemberView, v6: bool) -> str | None:
    """The member's data-plane address of one family: its gossip address, or one of
    the addresses its metadata lists (never a link-local one)."""
    for addr in (m.address[0], *m.meta.addresses):
        if (":" in addr) == v6 and not addr.lower().startswith("fe80"):
            return addr
    return None


def _is_v6(vip_key: str) -> bool:
    return vip_key.startswith("[")  # "addr:port/proto", IPv6 in brackets


def backend_sets(vips: Iterable[VipBackends], members: Iterable[MemberView],
                 drained: Collection[str] = (), *, serving: bool = True) -> dict[str, BackendSet]:
    """Every VIP's candidates (``VipBackends``) as the view ``members`` and the drain map
    (the keys drained) make them. ``serving`` False: this node takes no new flow at all
    (it is leaving), so nothing is healthy in its tables."""
    view = [m for m in members if m.status is not Status.LEFT]
    usable = set(usable_backends(view)) if serving else set()
    drained = frozenset(drained)
    # member -> the VIPs it serves; VIPs that share a spec and a serving set share the
    # work (1000 VIPs over one set of members build their backends once)
    serves = [(m, frozenset(m.meta.vips)) for m in sorted(view, key=lambda m: m.name)]
    all_servers = {server_name(s.host, s.port) for v in vips for s in v.servers}
    vips = list(vips)
    healthy_servers = usable_servers(view, all_servers) if serving and all_servers else set()
    by_name = {m.name: m for m, _ in serves}
    cache: dict[tuple[object, ...], tuple[tuple[Backend, ...], tuple[tuple[str, int], ...]]] = {}
    out: dict[str, BackendSet] = {}
    for v in vips:
        key = v.key
        v6 = _is_v6(key)
        admitted = v.members
        names = tuple(m.name for m, keys in serves if key in keys and (admitted is None or m.name in admitted))
        port = v.target_port if v.mode == "nat" else 0
        spec = (names, v6, port, tuple((s.host, s.port) for s in v.servers), v.weights, v.mode)
        hit = cache.get(spec)
        if hit is None:
            built = _candidates(v, names, by_name, v6, port, usable, healthy_servers, drained)
            hit = cache[spec] = (built, _table_set(built))
        out[key] = BackendSet(key, *hit)
    return out


def _candidates(v: VipBackends, names: Sequence[str], by_name: Mapping[str, MemberView], v6: bool, port: int,
                usable: Collection[str], healthy_servers: Collection[str],
                drained: Collection[str]) -> tuple[Backend, ...]:
    weights = dict(v.weights)
    out: list[Backend] = []
    for name in names:
        m = by_name[name]
        addr = member_address(m, v6)
        if addr is None:
            continue  # no address of the VIP's family: it cannot back this VIP
        weight = weights.get(name, 1)
        healthy = name in usable
        draining = weight == 0 or m.meta.weight == 0 or member_drain_key(name) in drained
        out.append(Backend(name, MEMBER, addr, port, weight, healthy, _state(healthy, draining)))
    for s in v.servers:
        name = server_name(s.host, s.port)
        weight = weights.get(name, 1)
        healthy = name in healthy_servers
        draining = weight == 0 or server_drain_key(s.host) in drained
        out.append(Backend(name, EXTERNAL, s.host, s.port if v.mode == "nat" else 0, weight, healthy,
                           _state(healthy, draining)))
    out.sort(key=lambda b: b.name)
    return tuple(out)


def _state(healthy: bool, draining: bool) -> str:
    if draining:
        return DRAINING
    return ACTIVE if healthy else DOWN


class UnknownBackend(ValueError):
    """A drain names nothing the cluster has; the message is one line."""


def drain_target(text: str, vips: Iterable[VipBackends], members: Iterable[str],
                 known_keys: Collection[str] = ()) -> str:
    """The drain map's key that ``text`` (``meshlb backend drain NAME|ADDRESS``) names:
    a member (of the view, or named by a VIP's ``members``), or the address of a VIP's
    server (every port of it, in every VIP). ``known_keys``: keys the map holds, which
    may name a backend the file no longer has (so that it can be undrained)."""
    vips = list(vips)
    names = set(members) | {n for v in vips if v.members for n in v.members}
    if text in names:
        return member_drain_key(text)
    servers = {str(ipaddress.ip_address(s.host)) for v in vips for s in v.servers}
    try:
        addr = str(ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text))
    except ValueError:
        addr = None
    if addr is not None and addr in servers:
        return server_drain_key(addr)
    for key in (member_drain_key(text), server_drain_key(addr or text)):
        if key in known_keys:
            return key
    if addr is None and ":" in text:
        host = text.rsplit(":", 1)[0].strip("[]")
        if _address(host) in servers:
            raise UnknownBackend(f"{text!r}: a server drains by its address alone (all its ports): {_address(host)}")
    shown = ", ".join(sorted(names)[:8]) or "none"
    shown_servers = ", ".join(sorted(servers)[:8]) or "none"
    raise UnknownBackend(f"no member or server named {text!r} in this cluster (members: {shown}; "
                         f"servers: {shown_servers})")


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None

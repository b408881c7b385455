"""From each VIP's backends to its forwarding table: the Maglev table and its digest.
Pure, so that every mix computes the same plan from the same backend sets
(meshlb/backends.py computes them from the cluster file and the agreed view) and a test
can check it without a kernel.

The plan names backends by name (a member's name, a server's "address:port"); the agent
maps names to data-plane backend ids and addresses.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from meshlb import maglev


class Vip(Protocol):
    """What planning reads of a VIP; :class:`meshlb.config.VipConfig` is one."""

    @property
    def key(self) -> str:
        """The VIP's name in gossip and digests: ``addr:port/proto`` (IPv6 in brackets)."""
        ...

    @property
    def ring_size(self) -> int: ...


V = TypeVar("V", bound=Vip)


@dataclass(frozen=True)
class VipPlan(Generic[V]):
    vip: V
    backends: tuple[str, ...]  # member names, sorted; the table indexes this tuple
    table: tuple[int, ...]
    digest: str


def plan_vip(vip: V, chosen: Sequence[tuple[str, int]]) -> VipPlan[V]:
    """``chosen``: (backend name, weight) of the VIP's backends (meshlb.backends)."""
    return plan([vip], {vip.key: chosen})[vip.key]


@functools.lru_cache(maxsize=16)
def _table(chosen: tuple[tuple[str, int], ...], size: int) -> tuple[tuple[str, ...], tuple[int, ...], str]:
    """VIPs usually share one backend set: build its table (a 65537-slot table takes
    tens of milliseconds in Python) and digest it once, not once per VIP and rebuild."""
    backends = [maglev.Backend(n, w) for n, w in chosen]
    names = tuple(maglev.canonical_names(backends))
    table = tuple(maglev.build_table(backends, size))
    return names, table, maglev.table_digest("", table, names)


def plan(vips: Sequence[V], chosen: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, VipPlan[V]]:
    """Each VIP's table from ``chosen``: VIP key -> (backend name, weight) of its
    backends (a VIP without an entry has none). A weight of 0 keeps a backend in the
    table's index space (its draining flows keep their backend id) without a slot."""
    out: dict[str, VipPlan[V]] = {}
    for v in vips:
        names, table, ring_digest = _table(tuple(sorted(chosen.get(v.key, ()))), v.ring_size)
        # the VIP's digest binds its name to the (shared) table's digest
        digest = hashlib.blake2b(f"{v.key}|{ring_digest}".encode(), digest_size=8, person=b"meshlb.vip").hexdigest()
        out[v.key] = VipPlan(v, names, table, digest)
    return out


def plans_digest(plans: Mapping[str, VipPlan[Any]]) -> str:
    """One digest over every VIP's table: what a member gossips and `members` compares."""
    if not plans:
        return ""
    h = hashlib.blake2b(digest_size=8, person=b"meshlb.fwd")
    for key in sorted(plans):
        h.update(key.encode() + b"=" + plans[key].digest.encode() + b";")
    return h.hexdigest()

"""From the cluster's view to forwarding tables: which members back each VIP, in what
Maglev table, with what digest. Pure, so that every mix computes the same plan from the
same view and a test can check it without a kernel.

A member backs a VIP when it is usable (``Node.usable_backends()``: alive, its own app
healthy, not seen down by a majority of its observers) and its gossiped metadata lists
the VIP. Its weight is its gossiped weight. The plan names backends by member name;
the agent maps names to data-plane backend ids and addresses.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
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


def plan_vip(vip: V, usable: Iterable[str], serving: Mapping[str, tuple[Sequence[str], int]]) -> VipPlan[V]:
    """``serving``: member name -> (the VIP keys it serves, its weight)."""
    return plan([vip], usable, serving)[vip.key]


@functools.lru_cache(maxsize=16)
def _table(chosen: tuple[tuple[str, int], ...], size: int) -> tuple[tuple[str, ...], tuple[int, ...], str]:
    """VIPs usually share one backend set: build its table (a 65537-slot table takes
    tens of milliseconds in Python) and digest it once, not once per VIP and rebuild."""
    backends = [maglev.Backend(n, w) for n, w in chosen]
    names = tuple(maglev.canonical_names(backends))
    table = tuple(maglev.build_table(backends, size))
    return names, table, maglev.table_digest("", table, names)


def plan(vips: Sequence[V], usable: Iterable[str],
         serving: Mapping[str, tuple[Sequence[str], int]]) -> dict[str, VipPlan[V]]:
    usable_set = set(usable)
    candidates = [
        (name, frozenset(keys), max(0, int(weight)))
        for name, (keys, weight) in serving.items()
        if name in usable_set
    ]
    out: dict[str, VipPlan[V]] = {}
    for v in vips:
        chosen = tuple(sorted((name, w) for name, keys, w in candidates if v.key in keys))
        names, table, ring_digest = _table(chosen, v.ring_size)
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

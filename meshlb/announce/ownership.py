"""Who answers ARP / neighbour solicitations for a VIP in L2 mode: a pure function of the
agreed cluster view, so every mix computes the same owner without election messages.

Inputs per VIP address: the *candidates* (members held alive whose data plane forwards
the VIP, from their gossiped metadata) and the *claims* (members that say they hold
it). Rules:

* sticky: a candidate that claims the VIP keeps it; a member that comes back (or
  joins) takes nothing from a healthy owner, since moving an owner moves every client's
  and router's ARP cache for nothing;
* when no candidate claims it, the top candidate of a rendezvous (highest-random-weight)
  ranking takes it: each mix ranks alike, and a VIP whose owner fails moves to a member
  picked per VIP, so the failed owner's VIPs spread over the survivors;
* two claiming candidates (a healed partition, or two views that disagreed for a
  moment) resolve by the same ranking: the lower-ranked one releases.

What a mix does with the answer is :func:`held`: it holds what it owns, and a VIP it held
but may no longer own (it leaves, its data plane stopped) until another candidate claims
it, so that the VIP is never answered by nobody while a successor exists.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet


def rank(vip: str, member: str) -> bytes:
    """Rendezvous weight of ``member`` for ``vip``: the same bytes on every mix and in
    every Python process (unlike ``hash()``), compared as big-endian numbers."""
    return hashlib.blake2b(f"{vip}\0{member}".encode(), digest_size=8).digest()


def _top(vip: str, members: Iterable[str]) -> str | None:
    return max(members, key=lambda m: (rank(vip, m), m), default=None)


def owners(vips: Iterable[str], candidates: Mapping[str, AbstractSet[str]],
           claims: Mapping[str, AbstractSet[str]]) -> dict[str, str | None]:
    """For each VIP address, the member that must answer for it (None: no candidate)."""
    out: dict[str, str | None] = {}
    for vip in vips:
        able = [m for m, ready in candidates.items() if vip in ready]
        claiming = [m for m in able if vip in claims.get(m, ())]
        out[vip] = _top(vip, claiming or able)
    return out


def held(local: str, vips: Iterable[str], candidates: Mapping[str, AbstractSet[str]],
         claims: Mapping[str, AbstractSet[str]], holding: AbstractSet[str]) -> frozenset[str]:
    """The VIP addresses ``local`` must hold now. ``candidates`` and ``claims`` include
    ``local`` itself as it is (``holding`` are its claims): a mix that may not own a VIP
    (leaving, not forwarding it) is no candidate for it, and keeps what it holds until
    some candidate other than itself claims it."""
    vips = list(vips)
    who = owners(vips, candidates, claims)
    out = set()
    for vip in vips:
        if who[vip] == local:
            out.add(vip)
        elif vip in holding and vip not in candidates.get(local, ()):
            successor = any(vip in claims.get(m, ()) and vip in ready
                            for m, ready in candidates.items() if m != local)
            if not successor:
                out.add(vip)
    return frozenset(out)


def conflicts(vips: Iterable[str], candidates: Mapping[str, AbstractSet[str]],
              claims: Mapping[str, AbstractSet[str]]) -> dict[str, list[str]]:
    """VIPs that more than one live member claims: two answer ARP for it (a partition
    that healed, or a hand-over in progress). Resolved by :func:`owners`; shown so that
    it is visible."""
    out = {}
    for vip in vips:
        claiming = sorted(m for m, c in claims.items() if vip in c and m in candidates)
        if len(claiming) > 1:
            out[vip] = claiming
    return out

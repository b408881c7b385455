"""Which backends are usable: one deterministic rule every member applies to its view.

Backend X is usable iff all of:

1. X is ALIVE in the membership view (a SUSPECT member is excluded at once: the
   balancer should stop sending new flows to a member we already doubt);
2. X's own meta says ``app_healthy`` (X knows best when its application is down or
   draining);
3. NOT more than half of the ALIVE members other than X report X's app as down
   (``observations[X] is False`` in their meta).

Why "half of the alive members" and not "half of those that report on X": every mix
health-checks every backend (the mix-mode design), so the alive members *are* the
observers, and counting only down reports lets a member gossip just its failed checks.
That keeps each member's meta O(failures) instead of O(N) -- an O(N) map of
observations would not fit a 1400-byte datagram past ~100 members. ``True`` entries
are accepted and count for nothing. A tie keeps X usable, so one member with a broken
path to X cannot take X out of everyone's table once there are three or more members.
With two members the other one *is* the majority: if it cannot reach X's app, it
cannot forward to it either, and both tables must still agree.

The result depends only on (name, status, meta) of the members, never on the order in
which they were learnt or on local time, and is returned sorted by name: two members
with the same view compute the same list, hence the same Maglev table.

Real servers (backends that run no meshlb, ``usable_servers``) are judged by rule 3
alone, counted over every alive member: nobody speaks for them, and every mix checks
them.
"""
from __future__ import annotations

from collections.abc import Iterable

from .membership import MemberView
from .messages import Status

__all__ = ["usable_backends", "usable_servers", "is_usable"]


def usable_backends(members: Iterable[MemberView]) -> list[str]:
    alive = {m.name: m for m in members if m.status is Status.ALIVE}
    down: dict[str, int] = {}
    for observer in alive.values():
        for target, ok in observer.meta.observations.items():
            if ok is False and target != observer.name and target in alive:
                down[target] = down.get(target, 0) + 1
    others = len(alive) - 1
    out = [name for name, m in alive.items()
           if m.meta.app_healthy and is_usable(down.get(name, 0), others)]
    out.sort()
    return out


def usable_servers(members: Iterable[MemberView], servers: Iterable[str]) -> set[str]:
    """Of ``servers`` (real servers that run no meshlb, named as the mixes' health
    checks name them), those rule 3 keeps: not more than half of the ALIVE members
    report them down. A server cannot speak for itself (rule 2), and no alive member is
    the server, so all alive members are its observers."""
    alive = [m for m in members if m.status is Status.ALIVE]
    wanted = set(servers)
    down: dict[str, int] = {}
    for observer in alive:
        for target, ok in observer.meta.observations.items():
            if ok is False and target in wanted:
                down[target] = down.get(target, 0) + 1
    return {s for s in wanted if is_usable(down.get(s, 0), len(alive))}


def is_usable(down_reports: int, other_alive: int) -> bool:
    """Rule 3 alone: strictly more than half of the other alive members say down."""
    return not (2 * down_reports > other_alive)

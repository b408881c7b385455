"""The member table and SWIM's incarnation rules.

Ordering of claims about a member X (inc = incarnation number, which only X raises):

* ``alive(i)``   wins over alive/suspect with inc < i, and over dead/left with inc < i
                 (a restarted member rejoins with a higher incarnation);
* ``suspect(i)`` wins over alive with inc <= i and suspect with inc < i; a suspect with
                 the same inc from another origin is a Lifeguard confirmation;
* ``dead(i)``    wins over alive/suspect with inc <= i;
* ``left(i)``    wins over alive/suspect/dead with inc <= i; only X says it (there is no
                 origin field), and X raises its incarnation before leaving.

Claims about ourselves are never accepted: suspect/dead/left about us while we are not
leaving, or alive about us that differs from what we are, make us *refute*: raise our
incarnation above the claim and gossip alive. That is what lets a falsely accused
member clear its name, and a restarted member (which starts with a fresh incarnation
from the caller) take over from its previous life.

Every operation here is O(1) in the cluster size except ``random_live``'s fallback.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from .messages import Alive, Dead, Left, MemberMeta, MemberRecord, Status, Suspect
from .suspicion import Suspicion

__all__ = ["MemberView", "MemberState", "MemberTable", "Verdict"]


@dataclass(frozen=True)
class MemberView:
    name: str
    address: tuple[str, int]
    status: Status
    incarnation: int
    meta: MemberMeta
    status_since: float


@dataclass(slots=True, eq=False)
class MemberState:
    name: str
    address: tuple[str, int]
    status: Status
    incarnation: int
    meta_version: int
    meta: MemberMeta
    status_since: float
    suspicion: Suspicion | None = None

    def view(self) -> MemberView:
        return MemberView(self.name, self.address, self.status, self.incarnation, self.meta,
                          self.status_since)

    def record(self) -> MemberRecord:
        return MemberRecord(self.name, self.address, self.status, self.incarnation,
                            self.meta_version, self.meta)


class Verdict(Enum):
    IGNORED = "ignored"
    REFUTE = "refute"  # a claim about us; the caller raises our incarnation
    JOINED = "joined"  # new member, alive
    REVIVED = "revived"  # dead/left -> alive (rejoin)
    RECOVERED = "recovered"  # suspect -> alive (refuted)
    UPDATED = "updated"  # alive -> alive, newer incarnation
    SUSPECTED = "suspected"
    CONFIRMED = "confirmed"  # an independent confirmation of an existing suspicion
    DIED = "died"
    LEFT = "left"


_LIVE = (Status.ALIVE, Status.SUSPECT)

# Creates a Suspicion for (member, incarnation, origin, now).
SuspicionFactory = Callable[[str, int, str, float], Suspicion]


class MemberTable:
    def __init__(self, local: MemberState, suspicion_factory: SuspicionFactory) -> None:
        self.local_name = local.name
        self._members: dict[str, MemberState] = {local.name: local}
        self._by_address: dict[tuple[str, int], str] = {local.address: local.name}
        # Other live (alive or suspect) members, for O(1) random choice.
        self._live: list[str] = []
        self._live_index: dict[str, int] = {}
        self._new_suspicion = suspicion_factory
        self.leaving = False

    # ---- lookups ---------------------------------------------------------------------

    @property
    def local(self) -> MemberState:
        return self._members[self.local_name]

    def get(self, name: str) -> MemberState | None:
        return self._members.get(name)

    def name_at(self, address: tuple[str, int]) -> str | None:
        return self._by_address.get(address)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[MemberState]:
        return iter(self._members.values())

    def live_count(self) -> int:
        """Alive or suspect members, ourselves included: the N of the timeouts."""
        return len(self._live) + 1

    def live_names(self) -> list[str]:
        return list(self._live)

    def random_live(self, rng: random.Random, k: int, exclude: tuple[str, ...] = (),
                    alive_only: bool = False) -> list[str]:
        """Up to k distinct other live members, uniformly, skipping `exclude`."""
        live = self._live
        n = len(live)
        if n == 0 or k <= 0:
            return []
        out: list[str] = []
        if k * 3 < n:
            # Rejection sampling: O(k) for k << N, the common case in a big cluster.
            tries = 0
            seen: set[str] = set()
            while len(out) < k and tries < k * 8:
                tries += 1
                name = live[rng.randrange(n)]
                if name in seen or name in exclude:
                    continue
                seen.add(name)
                if alive_only and self._members[name].status is not Status.ALIVE:
                    continue
                out.append(name)
            return out
        pool = [x for x in live if x not in exclude
                and (not alive_only or self._members[x].status is Status.ALIVE)]
        rng.shuffle(pool)
        return pool[:k]

    # ---- bookkeeping -----------------------------------------------------------------

    def _set_live(self, m: MemberState) -> None:
        if m.name == self.local_name:
            return
        is_live = m.status in _LIVE
        idx = self._live_index.get(m.name)
        if is_live and idx is None:
            self._live_index[m.name] = len(self._live)
            self._live.append(m.name)
        elif not is_live and idx is not None:
            last = self._live.pop()
            if last != m.name:
                self._live[idx] = last
                self._live_index[last] = idx
            del self._live_index[m.name]

    def _set_address(self, m: MemberState, address: tuple[str, int]) -> None:
        if m.address == address:
            return
        if self._by_address.get(m.address) == m.name:
            del self._by_address[m.address]
        m.address = address
        self._by_address[address] = m.name

    def _set_status(self, m: MemberState, status: Status, now: float) -> None:
        if m.status is not status:
            m.status = status
            m.status_since = now
        if status is not Status.SUSPECT:
            m.suspicion = None
        self._set_live(m)

    def remove(self, name: str) -> MemberState | None:
        """Forget a member entirely (reaping); never ourselves."""
        if name == self.local_name:
            return None
        m = self._members.pop(name, None)
        if m is None:
            return None
        if self._by_address.get(m.address) == name:
            del self._by_address[m.address]
        m.status = Status.DEAD
        self._set_live(m)
        return m

    # ---- rules -----------------------------------------------------------------------

    def apply_alive(self, a: Alive, now: float) -> tuple[Verdict, bool]:
        """(verdict, meta_changed)."""
        if a.name == self.local_name:
            local = self.local
            if self.leaving:
                return Verdict.IGNORED, False
            if a.incarnation > local.incarnation or (
                    a.incarnation == local.incarnation
                    and (a.address != local.address or a.meta_version != local.meta_version)):
                return Verdict.REFUTE, False
            return Verdict.IGNORED, False
        m = self._members.get(a.name)
        if m is None:
            m = MemberState(a.name, a.address, Status.ALIVE, a.incarnation, a.meta_version, a.meta, now)
            self._members[a.name] = m
            self._by_address[a.address] = a.name
            self._set_live(m)
            return Verdict.JOINED, True
        if a.incarnation <= m.incarnation:
            return Verdict.IGNORED, False
        meta_changed = a.meta_version != m.meta_version or a.meta != m.meta
        old = m.status
        m.incarnation = a.incarnation
        m.meta_version = a.meta_version
        m.meta = a.meta
        self._set_address(m, a.address)
        self._set_status(m, Status.ALIVE, now)
        if old is Status.ALIVE:
            return Verdict.UPDATED, meta_changed
        if old is Status.SUSPECT:
            return Verdict.RECOVERED, meta_changed
        return Verdict.REVIVED, meta_changed

    def apply_suspect(self, s: Suspect, now: float) -> Verdict:
        if s.name == self.local_name:
            if self.leaving or s.incarnation < self.local.incarnation:
                return Verdict.IGNORED
            return Verdict.REFUTE
        m = self._members.get(s.name)
        if m is None or m.status not in _LIVE or s.incarnation < m.incarnation:
            return Verdict.IGNORED
        if m.status is Status.SUSPECT and s.incarnation == m.incarnation:
            assert m.suspicion is not None
            return Verdict.CONFIRMED if m.suspicion.confirm(s.origin) else Verdict.IGNORED
        m.incarnation = s.incarnation
        self._set_status(m, Status.SUSPECT, now)
        m.status_since = now
        m.suspicion = self._new_suspicion(m.name, s.incarnation, s.origin, now)
        return Verdict.SUSPECTED

    def apply_dead(self, d: Dead, now: float) -> Verdict:
        if d.name == self.local_name:
            if self.leaving or d.incarnation < self.local.incarnation:
                return Verdict.IGNORED
            return Verdict.REFUTE
        m = self._members.get(d.name)
        if m is None or m.status not in _LIVE or d.incarnation < m.incarnation:
            return Verdict.IGNORED
        m.incarnation = d.incarnation
        self._set_status(m, Status.DEAD, now)
        return Verdict.DIED

    def apply_left(self, lv: Left, now: float) -> Verdict:
        if lv.name == self.local_name:
            if self.leaving or lv.incarnation < self.local.incarnation:
                return Verdict.IGNORED
            return Verdict.REFUTE
        m = self._members.get(lv.name)
        if m is None or m.status is Status.LEFT or lv.incarnation < m.incarnation:
            return Verdict.IGNORED
        m.incarnation = lv.incarnation
        self._set_status(m, Status.LEFT, now)
        return Verdict.LEFT

    # ---- local member ----------------------------------------------------------------

    def refute(self, claimed: int) -> int:
        local = self.local
        local.incarnation = max(local.incarnation, claimed) + 1
        return local.incarnation

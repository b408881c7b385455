"""The cluster's drain map: which backends take no new flow, as every member agrees.

An operator drains a backend (``meshlb backend drain``) on any one mix; every mix must
then avoid it for new flows, at once (so that the members' tables, and their digests,
stay equal), and keep doing so after the mix where it was issued dies and after any
agent restarts. So the map is replicated to every member, not held by one:

* it is a map key -> (drained, stamp, origin) where the larger (stamp, origin) wins, a
  last-writer-wins register per key. An undrain is an entry too (``drained`` False), so
  that an older "drained" arriving late cannot bring a drain back;
* stamps are milliseconds of a hybrid logical clock: the wall time of the write, or one
  more than the largest stamp this member has seen if that is later. A write made after
  this member saw another is ordered after it whatever the two hosts' clocks say; only
  writes on two members that had not heard of each other are ordered by wall time;
* a change is gossiped at once (the engine's transmit-limited queue, one slot per key:
  a newer write of a key replaces the older one still queued), and the whole map rides
  with every push-pull and join both ways, so a member that missed news, joins or comes
  back from a partition converges with the next exchange; a member that comes back from
  suspicion or death is sent the map at once;
* the agent saves it (``entries()``) on every change and hands it back
  (``restore()``) before it joins, so a cluster restarted as a whole keeps its drains.

Nothing here knows what a key means; meshlb.backends names them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import NamedTuple

from .delegate import Address, Handler, Host
from .messages import DrainEntry, DrainState
from .protocol_config import ProtocolConfig

__all__ = ["DrainGossip", "DrainsChanged", "DrainEvent", "MAX_DRAIN_KEYS"]

# Keys name backends of the cluster file; the bound only stops a hostile or buggy
# member from growing the map without end. Undrained entries are forgotten first.
MAX_DRAIN_KEYS = 4096


class DrainsChanged(NamedTuple):
    """Keys whose drained state changed in this member's map."""
    keys: tuple[str, ...]


DrainEvent = DrainsChanged


def _bkey(key: str) -> Hashable:
    return ("d", key)


class DrainGossip:
    """The drain map of one member (a :class:`meshlb.cluster.delegate.Delegate`)."""

    def __init__(self, *, name: str, config: ProtocolConfig) -> None:
        self.name = name
        self.config = config
        self._entries: dict[str, DrainEntry] = {}
        self._clock = 0  # the largest stamp seen
        self.host: Host[DrainEvent]
        self._counters: Counter[str] = Counter()

    # ---- what the owner calls ---------------------------------------------------------

    def set(self, key: str, drained: bool, wall_ms: int, now: float) -> DrainEntry:
        """Write ``key`` (``wall_ms``: this host's wall clock, in milliseconds) and
        gossip it."""
        if not key or not key.isprintable() or len(key) > 128:
            raise ValueError("a drain key is 1..128 printable characters")
        entry = DrainEntry(key, bool(drained), max(int(wall_ms), self._clock + 1), self.name)
        self._adopt([entry])
        self._counters["drain_writes"] += 1
        self._spread([entry], now)
        self.host.emit(DrainsChanged((key,)))
        return entry

    def restore(self, entries: Iterable[DrainEntry]) -> int:
        """Entries saved by a previous run of this member (before it joins); newer
        ones it already holds win. Returns how many were taken."""
        return len(self._adopt(entries))

    def entries(self) -> list[DrainEntry]:
        """The whole map, drained and undrained keys, sorted by key (what to save)."""
        return [self._entries[k] for k in sorted(self._entries)]

    def drained(self) -> frozenset[str]:
        return frozenset(k for k, e in self._entries.items() if e.drained)

    # ---- the delegate -----------------------------------------------------------------

    def attach(self, host: Host[DrainEvent], now: float) -> None:
        self.host = host
        self._counters = host.counters

    def handlers(self) -> Mapping[type, Handler]:
        return {DrainState: self._on_state}

    def local_state(self, now: float, *, join: bool, reply: bool) -> list[bytes]:
        return self._messages(self.entries())

    def joining(self, now: float) -> None:
        pass

    def member_back(self, address: Address, now: float) -> None:
        # it may have missed our writes, we its: it answers with what it has newer
        if self._entries:
            self.host.send(address, self._messages(self.entries()))

    def final_after_full_round(self, key: Hashable) -> bool:
        return False

    def tick(self, now: float) -> None:
        pass

    def next_deadline(self) -> float:
        return float("inf")

    def maintain(self, now: float) -> None:
        pass

    def flush(self) -> None:
        pass

    def stats(self, out: Counter[str]) -> None:
        out["drained"] = sum(1 for e in self._entries.values() if e.drained)

    # ---- inside -----------------------------------------------------------------------

    def _adopt(self, entries: Iterable[DrainEntry]) -> list[DrainEntry]:
        """Merge; returns the entries taken (newer than what was held)."""
        taken = []
        for e in entries:
            self._clock = max(self._clock, e.stamp)
            cur = self._entries.get(e.key)
            if cur is None or e.newer_than(cur):
                self._entries[e.key] = e
                taken.append(e)
        if len(self._entries) > MAX_DRAIN_KEYS:
            self._bound()
        return taken

    def _bound(self) -> None:
        # forget the oldest undrained keys first, then the oldest drained ones
        order = sorted(self._entries.values(), key=lambda e: (e.drained, e.stamp, e.key))
        for e in order[:len(self._entries) - MAX_DRAIN_KEYS]:
            del self._entries[e.key]
            self._counters["drain_keys_forgotten"] += 1

    def _spread(self, entries: list[DrainEntry], now: float) -> None:
        host = self.host
        for e in entries:
            host.broadcast(_bkey(e.key), host.encode(DrainState((e,))), self.config.retransmit_mult)
        host.expedite(now, 0.0)

    def _on_state(self, now: float, msg: DrainState, sender: str, source: Address) -> None:
        taken = self._adopt(msg.entries)
        c = self._counters
        if taken:
            c["drain_entries_taken"] += len(taken)
            self._spread(taken, now)
            self.host.emit(DrainsChanged(tuple(sorted({e.key for e in taken}))))

    def _messages(self, entries: list[DrainEntry]) -> list[bytes]:
        """``entries`` as DrainState messages, each fitting a datagram."""
        host = self.host
        cap = host.capacity - 16
        out: list[bytes] = []
        batch: list[DrainEntry] = []
        used = 0
        for e in entries:
            size = len(e.key.encode()) + len(e.origin.encode()) + 16
            if batch and (used + size > cap or len(batch) >= 256):
                out.append(host.encode(DrainState(tuple(batch))))
                batch, used = [], 0
            batch.append(e)
            used += size
        if batch:
            out.append(host.encode(DrainState(tuple(batch))))
        return out

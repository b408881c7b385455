"""Transmit-limited piggyback queue.

Every update (member state change, eviction) is sent a bounded number of times by
each member that learns it: ``retransmit_limit(mult, N)`` = mult * ceil(log10(N+1)),
the O(log N) budget that makes an epidemic reach everyone with high probability.
Updates ride on whatever datagram goes out (pings, acks, gossip rounds), least-sent
first and, among equals, newest first: a new update is what others most likely lack.

An update has a key; queueing a new one under the same key drops the old one
(``alive`` about X supersedes ``suspect`` about X), so the queue holds at most one
state per member however much churn there is. The queue is bounded; when full, the
most-sent (and so least useful) updates go first.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .protocol_config import retransmit_limit

__all__ = ["BroadcastQueue"]


@dataclass(slots=True)
class _Item:
    key: Hashable
    data: bytes
    mult: int
    transmits: int = 0


class BroadcastQueue:
    # A gossip datagram is filled by looking at no more than this many queued items;
    # keeps the per-datagram cost bounded even with a long queue.
    SCAN_LIMIT = 512
    MISS_LIMIT = 16

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = max_items
        # transmits -> {key: item}, dicts keep insertion order = age.
        # OrderedDict: dropping the oldest is popitem(last=False), O(1); a plain dict
        # emptied from the front makes each next(iter()) scan its deleted slots
        self._buckets: dict[int, OrderedDict[Hashable, _Item]] = {}
        self._where: dict[Hashable, int] = {}
        self.dropped = 0  # items pushed out because the queue was full
        self.invalidated = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def transmits(self, key: Hashable) -> int | None:
        return self._where.get(key)

    def queue(self, key: Hashable, data: bytes, mult: int) -> None:
        old = self._where.pop(key, None)
        if old is not None:
            del self._buckets[old][key]
            if not self._buckets[old]:
                del self._buckets[old]
            self.invalidated += 1
        fresh = self._buckets.get(0)
        if fresh is None:
            fresh = self._buckets[0] = OrderedDict()
        fresh[key] = _Item(key, data, mult)
        self._where[key] = 0
        while len(self._where) > self.max_items:
            self._drop_most_sent()

    def discard(self, key: Hashable) -> bool:
        t = self._where.pop(key, None)
        if t is None:
            return False
        del self._buckets[t][key]
        if not self._buckets[t]:
            del self._buckets[t]
        return True

    def peek(self, key: Hashable) -> bytes | None:
        t = self._where.get(key)
        return None if t is None else self._buckets[t][key].data

    def _drop_most_sent(self) -> None:
        top = max(self._buckets)
        bucket = self._buckets[top]
        key, _ = bucket.popitem(last=False)
        if not bucket:
            del self._buckets[top]
        del self._where[key]
        self.dropped += 1

    def take(self, budget: int, overhead: int, n_members: int,
             skip: Callable[[Hashable], bool] | None = None,
             taken: set[Hashable] | None = None, copies: int = 1,
             final: Callable[[Hashable], bool] | None = None) -> list[bytes]:
        """Pick updates whose sizes (+overhead each) fit in budget bytes and count
        ``copies`` transmits for each (the caller sends the result to that many
        members); items reaching their limit leave the queue, and so do the picked
        items whose key ``final`` accepts. With ``taken``, items whose key is in it
        are passed over and the picked keys are added (several datagrams to one
        member never repeat an update)."""
        if taken is not None:
            outer = skip
            skip = (lambda k: k in taken or outer(k)) if outer is not None else taken.__contains__
        if budget <= overhead or not self._where:
            return []
        picked: list[_Item] = []
        scanned = 0
        misses = 0
        done = False
        for t in sorted(self._buckets):
            for item in reversed(self._buckets[t].values()):
                scanned += 1
                cost = len(item.data) + overhead
                if cost > budget or (skip is not None and skip(item.key)):
                    misses += 1
                    # A nearly full datagram: more scanning rarely finds a fit.
                    if misses >= self.MISS_LIMIT or scanned >= self.SCAN_LIMIT:
                        done = True
                        break
                    continue
                misses = 0
                budget -= cost
                picked.append(item)
                if budget <= overhead or scanned >= self.SCAN_LIMIT:
                    done = True
                    break
            if done:
                break
        out = []
        limits: dict[int, int] = {}
        if taken is not None:
            taken.update(item.key for item in picked)
        for item in picked:
            bucket = self._buckets[item.transmits]
            del bucket[item.key]
            if not bucket:
                del self._buckets[item.transmits]
            item.transmits += copies
            out.append(item.data)
            limit = limits.get(item.mult)
            if limit is None:
                limit = limits[item.mult] = retransmit_limit(item.mult, n_members)
            if item.transmits >= limit or (final is not None and final(item.key)):
                del self._where[item.key]
            else:
                self._buckets.setdefault(item.transmits, OrderedDict())[item.key] = item
                self._where[item.key] = item.transmits
        return out

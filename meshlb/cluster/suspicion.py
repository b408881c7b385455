"""Lifeguard suspicion timer.

A suspicion starts long (``max``) and shrinks towards ``min`` as independent members
confirm it, on a log scale:

    timeout(C) = max(min, max - (max - min) * log(C + 1) / log(K + 1))

with K the number of confirmations we expect to get. A lone false suspicion (one
member with a bad link) therefore lasts long enough for the target to hear of it and
refute, while a real crash, which every prober sees, is declared quickly.

The timer is measured from when the suspicion started here, so a confirmation that
arrives late can bring the deadline to "now": the owner checks ``deadline`` on tick.
"""
from __future__ import annotations

import math

__all__ = ["Suspicion", "suspicion_timeout"]


def suspicion_timeout(confirmations: int, k: int, lo: float, hi: float) -> float:
    if k < 1 or hi <= lo:
        return lo
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(lo, hi - (hi - lo) * frac)


class Suspicion:
    __slots__ = ("incarnation", "start", "k", "min", "max", "_seen", "confirmations", "deadline")

    def __init__(self, *, origin: str, incarnation: int, start: float, k: int, min_timeout: float,
                 max_timeout: float) -> None:
        self.incarnation = incarnation
        self.start = start
        self.k = max(0, k)
        self.min = min_timeout
        self.max = max(min_timeout, max_timeout)
        # The origin's own accusation is not a confirmation of itself.
        self._seen = {origin}
        self.confirmations = 0
        self.deadline = start + (self.min if self.k < 1 else self.max)

    def confirm(self, origin: str) -> bool:
        """Record an independent accusation; True if it was new (worth re-gossiping)."""
        if self.confirmations >= self.k or origin in self._seen:
            return False
        self._seen.add(origin)
        self.confirmations += 1
        self.deadline = self.start + suspicion_timeout(self.confirmations, self.k, self.min, self.max)
        return True

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

"""Lifeguard's local health awareness.

A member that is itself slow (CPU starved, dropping packets) sees other members miss
its deadlines and would falsely suspect them. The score counts recent evidence that
*we* are the problem: missed nacks (a helper we asked did not even tell us it failed),
probes we had to give up on with no helper to blame, and having to refute a suspicion
about ourselves. Successful probes pay it back. The score multiplies the probe interval
and the probe timeout, so an unhealthy member probes more slowly and waits longer
before it accuses anyone.
"""
from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    __slots__ = ("max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be >= 1")
        self.max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """0 (healthy) .. max-1."""
        return self._score

    def apply(self, delta: int) -> int:
        self._score = min(self.max - 1, max(0, self._score + delta))
        return self._score

    def scale(self, timeout: float) -> float:
        return timeout * (self._score + 1)

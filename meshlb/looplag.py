"""How late the agent's event loop runs its callbacks.

Everything the agent does for the cluster runs on one loop: answering probes, reading
socket closes, applying evictions. A loop that falls behind answers probes late, and
peers start to suspect a member that is only busy. This measures it: a timer that should
fire every ``interval`` seconds records how late it fired, as a histogram.
"""
from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class LoopLag:
    interval: float = 0.1
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total_s: float = 0.0
    max_s: float = 0.0

    def observe(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.counts[bisect.bisect_left(BUCKETS, lag)] += 1
        self.total_s += lag
        self.max_s = max(self.max_s, lag)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count at or below it) pairs, "+Inf" last: Prometheus buckets."""
        out, acc = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts):
            acc += n
            out.append((bound, acc))
        return out

    def as_json(self) -> dict[str, object]:
        return {"samples": sum(self.counts), "max_s": round(self.max_s, 4),
                "sum_s": round(self.total_s, 4),
                "over_100ms": sum(self.counts[BUCKETS.index(0.1) + 1:])}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.observe(loop.time() - due)

"""Per-source token buckets that shed a datagram flood before it costs decryption.

Sans-IO: the caller passes ``now`` (seconds, any monotonic origin).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["RateLimiter"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float


class RateLimiter:
    """``rate`` datagrams per second per source, with bursts of up to ``burst``.

    A source is a ``(host, port)`` tuple as a datagram endpoint reports it; buckets
    are keyed by the host alone, because a sender picks its source port freely.

    At most ``max_sources`` buckets are kept, least recently seen evicted first. The
    trade-off: a source whose bucket is evicted comes back with a full burst, so an
    attacker spraying from more than ``max_sources`` addresses can keep refreshing
    its budget. Such an attacker can flood from fresh addresses anyway; the bound is
    there so that spoofed addresses cannot grow memory without limit.
    """

    __slots__ = ("rate", "burst", "max_sources", "_buckets", "limited")

    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive finite number of datagrams per second")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("burst must be at least 1")
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        self.limited = 0

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def _key(source: object) -> Hashable:
        if isinstance(source, tuple) and source:
            host: Hashable = source[0]
            return host
        return source

    def allow(self, now: float, source: object) -> bool:
        """Take one token from the source's bucket; False if it is empty."""
        key = self._key(source)
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(self.burst, now)
            self._buckets[key] = b
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = now - b.last
            if elapsed > 0:
                b.tokens = min(self.burst, b.tokens + elapsed * self.rate)
            # Also taken when the clock stepped backwards: such a step must neither
            # mint tokens nor freeze the bucket until the clock catches up. A NaN
            # `now` is ignored so it cannot poison the bucket for good.
            if now == now:
                b.last = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        self.limited += 1
        return False

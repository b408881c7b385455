"""The simulated network under ``meshlb.cluster.sim``: latency, loss, duplication,
reordering, partitions and multicast group delivery, all drawn from one seeded
``random.Random`` so a run is a pure function of its seed.

The network knows members only by index (0..N-1); the simulator maps the protocol's
``(host, port)`` addresses to indices. ``route`` returns the copies that will arrive
and when; it never touches a node, so the engine decides what "arrive" means for a
crashed or descheduled receiver.

Reordering is not a separate knob: every copy gets its own jitter, so two datagrams
sent back to back arrive in either order whenever their jitter differs by more than
the gap between them, as on a real switched LAN with queueing.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["NetConfig", "Partition", "SimNetwork", "parse_partition", "parse_fraction"]


@dataclass(frozen=True)
class Partition:
    """Members in different ``groups`` cannot reach each other during [start, end).

    A member in no group reaches everyone, which is how a partial partition (one rack cut
    off, the rest still talking to both sides) is written.
    """

    groups: tuple[frozenset[int], ...]
    start: float
    end: float

    def side(self, idx: int) -> int:
        for k, g in enumerate(self.groups):
            if idx in g:
                return k
        return -1

    def separates(self, a: int, b: int, t: float) -> bool:
        if not (self.start <= t < self.end):
            return False
        sa = self.side(a)
        if sa < 0:
            return False
        sb = self.side(b)
        return sb >= 0 and sa != sb

    def involves(self, idx: int) -> bool:
        return self.side(idx) >= 0

    def describe(self) -> str:
        def rng(g: frozenset[int]) -> str:
            s = sorted(g)
            runs, lo, prev = [], s[0], s[0]
            for x in s[1:]:
                if x != prev + 1:
                    runs.append(f"{lo}-{prev}" if prev != lo else f"{lo}")
                    lo = x
                prev = x
            runs.append(f"{lo}-{prev}" if prev != lo else f"{lo}")
            return ",".join(runs)

        return "|".join(rng(g) for g in self.groups) + f"@{self.start:g}-{self.end:g}"


def parse_fraction(text: str | float, what: str = "value") -> float:
    """``0.05``, ``5%`` -> 0.05; a value outside [0, 1] is an error."""
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        s = str(text).strip()
        try:
            v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(f"{what} must be a fraction like 0.05 or a percentage like 5%, got {text!r}") from None
    if not math.isfinite(v) or v < 0.0 or v > 1.0:
        raise ValueError(f"{what} must be between 0 and 1 (or 0% and 100%), got {text!r}")
    return v


def _parse_members(text: str, n: int) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty member list in {text!r}")
        if "-" in part:
            lo_s, hi_s = part.split("-", 1)
            lo, hi = int(lo_s), int(hi_s)
        else:
            lo = hi = int(part)
        if lo > hi or lo < 0 or hi >= n:
            raise ValueError(f"member range {part!r} is outside 0-{n - 1}")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def parse_partition(spec: str, n: int) -> Partition:
    """Parse ``GROUPS@START-END`` (seconds of simulated time).

    GROUPS is either ``|``-separated member sets (``0-49|50-99``, ``0,3,7|8-20``), or a
    fraction ``30%``/``0.3`` meaning the first 30% of members against the rest.
    """
    if "@" not in spec:
        raise ValueError(f"partition {spec!r}: expected GROUPS@START-END, e.g. 0-49|50-99@10-30 or 50%@10-30")
    groups_s, window = spec.rsplit("@", 1)
    try:
        start_s, end_s = window.split("-", 1)
        start, end = float(start_s), float(end_s)
    except ValueError:
        raise ValueError(f"partition {spec!r}: window must be START-END in seconds, e.g. 10-30") from None
    if not (0 <= start < end) or not math.isfinite(end):
        raise ValueError(f"partition {spec!r}: need 0 <= START < END")
    try:
        if "|" in groups_s:
            groups = tuple(_parse_members(g, n) for g in groups_s.split("|"))
        else:
            frac = parse_fraction(groups_s, "partition fraction")
            cut = round(frac * n)
            if cut <= 0 or cut >= n:
                raise ValueError(f"fraction {groups_s!r} of {n} members leaves one side empty")
            groups = (frozenset(range(cut)), frozenset(range(cut, n)))
    except ValueError as exc:
        raise ValueError(f"partition {spec!r}: {exc}") from None
    seen: set[int] = set()
    for g in groups:
        if seen & g:
            raise ValueError(f"partition {spec!r}: a member is in two groups")
        seen |= g
    if len(groups) < 2:
        raise ValueError(f"partition {spec!r}: needs at least two groups")
    return Partition(groups=groups, start=start, end=end)


@dataclass
class NetConfig:
    """One knob per effect. Latencies are one-way, in seconds."""

    latency_s: float = 0.0005
    # mean of an exponential extra delay on every copy; the long tail is what reorders
    jitter_s: float = 0.0002
    loss: float = 0.0
    duplicate: float = 0.0
    multicast: bool = False
    partitions: tuple[Partition, ...] = field(default_factory=tuple)


class SimNetwork:
    def __init__(self, config: NetConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        # partition windows are in seconds after ``origin`` (the scenario's time zero)
        self.origin = 0.0
        # why a datagram (or one copy of a group datagram) did not arrive, plus totals
        self.counters: Counter[str] = Counter()

    def blocked(self, a: int, b: int, t: float) -> bool:
        t -= self.origin
        for p in self.config.partitions:
            if p.separates(a, b, t):
                return True
        return False

    def partition_explains(self, idx: int, t: float, grace: float) -> bool:
        """Whether a suspicion of ``idx`` at ``t`` may be the partition's doing: the member
        was on one side of a partition that was active, or healed less than ``grace`` ago."""
        t -= self.origin
        for p in self.config.partitions:
            if p.start <= t < p.end + grace and p.involves(idx):
                return True
        return False

    def route(self, t: float, src: int, dst: int) -> tuple[float, ...]:
        """Arrival times of the copies of one datagram from ``src`` to ``dst`` sent at ``t``.

        Empty when it is lost or cut by a partition; two entries when duplicated.
        """
        cfg = self.config
        c = self.counters
        if cfg.partitions and self.blocked(src, dst, t):
            c["partition"] += 1
            return ()
        rnd = self.rng.random
        if cfg.loss and rnd() < cfg.loss:
            c["loss"] += 1
            return ()
        jit = cfg.jitter_s
        exp = self.rng.expovariate
        first = t + cfg.latency_s + (exp(1.0 / jit) if jit > 0 else 0.0)
        if cfg.duplicate and rnd() < cfg.duplicate:
            c["duplicated"] += 1
            return (first, t + cfg.latency_s + (exp(1.0 / jit) if jit > 0 else 0.0))
        return (first,)

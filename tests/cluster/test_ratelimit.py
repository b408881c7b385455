from __future__ import annotations

import math

import pytest

from meshlb.cluster.ratelimit import RateLimiter

SRC = ("10.0.0.1", 7946)


def drain(rl: RateLimiter, now: float, source=SRC, limit: int = 10_000) -> int:
    n = 0
    while n < limit and rl.allow(now, source):
        n += 1
    return n


def test_burst_then_refused():
    rl = RateLimiter(rate=10, burst=5)
    assert drain(rl, 0.0) == 5
    assert rl.allow(0.0, SRC) is False
    assert rl.limited == 2  # the one that ended drain() and this one


def test_refill_at_rate_and_capped_at_burst():
    # Binary-exact times and rate, so the arithmetic below has no rounding.
    rl = RateLimiter(rate=8, burst=5)
    drain(rl, 0.0)
    assert drain(rl, 0.3125) == 2  # 2.5 tokens -> 2 datagrams, 0.5 left
    assert drain(rl, 0.375) == 1  # 0.5 + 0.5
    assert drain(rl, 1000.0) == 5  # a long silence only refills up to the burst


def test_sources_are_independent_and_keyed_by_host():
    rl = RateLimiter(rate=1, burst=2)
    assert drain(rl, 0.0, ("10.0.0.1", 1)) == 2
    assert rl.allow(0.0, ("10.0.0.1", 2)) is False  # another port, same host
    assert drain(rl, 0.0, ("10.0.0.2", 1)) == 2


def test_clock_stepping_back_mints_nothing_and_does_not_freeze():
    rl = RateLimiter(rate=10, burst=2)
    drain(rl, 100.0)
    assert rl.allow(50.0, SRC) is False
    # Refill is measured from the last observation, not from the old, later one.
    assert drain(rl, 50.1) == 1


def test_nan_time_does_not_poison_a_bucket():
    rl = RateLimiter(rate=10, burst=2)
    drain(rl, 0.0)
    assert rl.allow(math.nan, SRC) is False
    assert drain(rl, 1.0) == 2


def test_tracked_sources_are_bounded_lru():
    rl = RateLimiter(rate=1, burst=1, max_sources=3)
    for host in ("a", "b", "c"):
        assert rl.allow(0.0, (host, 1))
    assert rl.allow(0.0, ("a", 1)) is False  # touches a: now b is least recent
    assert rl.allow(0.0, ("d", 1))  # evicts b
    assert len(rl) == 3
    assert rl.allow(0.0, ("a", 1)) is False  # a was kept, still empty
    assert rl.allow(0.0, ("b", 1)) is True  # b was forgotten: a full bucket again
    for i in range(1000):
        rl.allow(0.0, (f"h{i}", 1))
    assert len(rl) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "burst": 1},
        {"rate": -1, "burst": 1},
        {"rate": math.inf, "burst": 1},
        {"rate": 1, "burst": 0.5},
        {"rate": 1, "burst": math.nan},
        {"rate": 1, "burst": 1, "max_sources": 0},
    ],
)
def test_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)

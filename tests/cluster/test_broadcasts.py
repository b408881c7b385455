"""Transmit-limited piggyback queue."""
from __future__ import annotations

import pytest

from meshlb.cluster.broadcasts import BroadcastQueue
from meshlb.cluster.protocol_config import retransmit_limit


def test_retransmit_limit_grows_with_log_n():
    assert retransmit_limit(4, 1) == 4
    assert retransmit_limit(4, 9) == 4
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 100) == 12
    assert retransmit_limit(4, 1000) == 16


def test_each_update_is_sent_exactly_limit_times():
    q = BroadcastQueue(100)
    q.queue("a", b"A" * 10, mult=2)  # N=5: limit 2
    q.queue("b", b"B" * 10, mult=3)  # limit 3
    sent = []
    for _ in range(10):
        sent.extend(q.take(1000, 0, 5))
    assert sent.count(b"A" * 10) == retransmit_limit(2, 5) == 2
    assert sent.count(b"B" * 10) == 3
    assert len(q) == 0


def test_least_sent_first_then_newest_first():
    q = BroadcastQueue(100)
    q.queue("old", b"o" * 10, mult=4)
    assert q.take(1000, 0, 5) == [b"o" * 10]
    q.queue("new1", b"1" * 10, mult=4)
    q.queue("new2", b"2" * 10, mult=4)
    # room for two: the two never-sent ones, newest first
    assert q.take(20, 0, 5) == [b"2" * 10, b"1" * 10]
    assert q.transmits("old") == 1 and q.transmits("new1") == 1


def test_budget_and_overhead_are_respected_and_small_items_fill_gaps():
    q = BroadcastQueue(100)
    q.queue("big", b"x" * 50, mult=4)
    q.queue("small", b"y" * 5, mult=4)
    q.queue("big2", b"z" * 50, mult=4)
    out = q.take(62, 2, 5)
    assert out == [b"z" * 50, b"y" * 5]
    assert sum(len(m) + 2 for m in out) <= 62
    assert q.take(10, 10, 5) == []  # overhead alone fills it


def test_newer_update_for_the_same_key_supersedes():
    q = BroadcastQueue(100)
    q.queue(("m", "x"), b"suspect", mult=4)
    q.take(1000, 0, 5)
    q.queue(("m", "x"), b"alive", mult=4)
    assert len(q) == 1 and q.invalidated == 1
    assert q.transmits(("m", "x")) == 0  # a fresh update gets a fresh budget
    assert q.take(1000, 0, 5) == [b"alive"]


def test_bounded_drops_most_sent_first():
    q = BroadcastQueue(3)
    q.queue("a", b"a", mult=4)
    q.take(1000, 0, 5)  # a: 1 transmit
    q.queue("b", b"b", mult=4)
    q.queue("c", b"c", mult=4)
    q.queue("d", b"d", mult=4)
    assert len(q) == 3 and "a" not in q and q.dropped == 1


def test_skip_predicate_and_discard():
    q = BroadcastQueue(10)
    q.queue("a", b"a", mult=4)
    q.queue("b", b"b", mult=4)
    assert q.take(100, 0, 5, skip=lambda k: k == "a") == [b"b"]
    assert q.discard("a") and not q.discard("a")
    assert q.peek("b") == b"b" and q.peek("a") is None


def test_scan_is_bounded_per_take():
    q = BroadcastQueue(5000)
    for i in range(2000):
        q.queue(i, b"x" * 100, mult=4)
    out = q.take(BroadcastQueue.SCAN_LIMIT * 200, 0, 5)
    assert len(out) == BroadcastQueue.SCAN_LIMIT


def test_invalid_size():
    with pytest.raises(ValueError):
        BroadcastQueue(0)

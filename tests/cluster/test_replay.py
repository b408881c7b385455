from __future__ import annotations

import random

import pytest

from meshlb.cluster.replay import ReplayGuard, Verdict

F, R, S = Verdict.FRESH, Verdict.REPLAYED, Verdict.STALE


def test_first_datagram_fresh_then_replayed():
    g = ReplayGuard(window=8)
    assert g.commit("a", 1, 100) is F
    assert g.commit("a", 1, 100) is R
    assert g.commit("b", 1, 100) is F  # windows are per sender


def test_check_never_changes_state():
    g = ReplayGuard(window=8)
    for _ in range(3):
        assert g.check("a", 1, 5) is F
    assert "a" not in g
    g.commit("a", 1, 5)
    assert g.check("a", 1, 6) is F
    assert g.commit("a", 1, 6) is F  # check did not record 6


def test_window_edges():
    w = 8
    g = ReplayGuard(window=w)
    g.commit("a", 1, 100)
    # top - (w-1) is the oldest seq still inside the window; top - w is outside.
    assert g.commit("a", 1, 100 - (w - 1)) is F
    assert g.commit("a", 1, 100 - (w - 1)) is R
    assert g.commit("a", 1, 100 - w) is S
    assert g.commit("a", 1, 0) is S
    # Out-of-order arrivals inside the window are fine once each.
    for s in (99, 95, 97):
        assert g.commit("a", 1, s) is F
        assert g.commit("a", 1, s) is R


def test_window_slides_and_remembers_shifted_bits():
    g = ReplayGuard(window=8)
    g.commit("a", 1, 10)
    g.commit("a", 1, 8)
    g.commit("a", 1, 13)  # slide by 3
    assert g.commit("a", 1, 10) is R
    assert g.commit("a", 1, 8) is R
    assert g.commit("a", 1, 9) is F
    assert g.commit("a", 1, 6) is F  # 13 - 6 = 7: last slot inside the window
    assert g.commit("a", 1, 5) is S  # 13 - 5 = 8: just outside


def test_big_jump_clears_window():
    g = ReplayGuard(window=8)
    for s in range(1, 9):
        g.commit("a", 1, s)
    g.commit("a", 1, 10_000)
    assert g.commit("a", 1, 9_999) is F
    assert g.commit("a", 1, 9_993) is F
    assert g.commit("a", 1, 9_992) is S
    assert g.commit("a", 1, 8) is S


def test_newer_epoch_resets_older_is_stale():
    g = ReplayGuard(window=8)
    g.commit("a", 100, 500)
    assert g.commit("a", 200, 1) is F  # restarted: seq starts over
    assert g.commit("a", 200, 2) is F
    assert g.commit("a", 100, 501) is S  # the old incarnation's datagrams are dead
    assert g.commit("a", 200, 1) is R


def test_matches_a_reference_model_on_random_traffic():
    rng = random.Random(1234)
    w = 32
    g = ReplayGuard(window=w)
    seen: set[int] = set()
    top = -1
    for _ in range(20_000):
        seq = max(0, top + rng.randint(-40, 6))
        if seq > top:
            expect = F
        elif top - seq >= w:
            expect = S
        elif seq in seen:
            expect = R
        else:
            expect = F
        assert g.commit("a", 1, seq) is expect, (seq, top)
        if expect is F:
            seen.add(seq)
            top = max(top, seq)


def test_bounded_senders_lru_and_tombstones():
    g = ReplayGuard(window=8, max_senders=3)
    for i, name in enumerate("abc"):
        g.commit(name, 1, 10)
    g.commit("a", 1, 11)  # a is now the most recently heard
    g.commit("d", 1, 10)  # evicts b, the least recently heard
    assert len(g) == 3 and "b" not in g and "a" in g
    # b's tombstone still refuses its old datagrams but lets it carry on.
    assert g.commit("b", 1, 10) is S
    assert g.commit("b", 1, 9) is S
    assert g.commit("b", 1, 11) is F
    assert "b" in g and g.commit("b", 1, 11) is R
    assert g.check("b", 0, 99) is S


def test_tombstones_are_bounded_too():
    g = ReplayGuard(window=4, max_senders=2)
    for i in range(100):
        g.commit(f"n{i}", 1, 5)
    assert len(g) == 2
    assert len(g._tombstones) <= 2
    # The oldest senders lost everything: that is the documented trade-off.
    assert g.check("n0", 1, 5) is F
    # The most recently buried ones are still protected.
    assert g.check("n97", 1, 5) is S


def test_forget_keeps_a_tombstone():
    g = ReplayGuard(window=8)
    g.commit("a", 7, 40)
    g.commit("a", 7, 38)
    g.forget("a")
    assert "a" not in g
    assert g.commit("a", 7, 38) is S  # a captured datagram cannot resurrect it
    assert g.commit("a", 7, 39) is S  # unseen-but-old is lost too (documented)
    assert g.commit("a", 7, 41) is F  # a falsely reaped member keeps talking
    g.forget("a")
    assert g.commit("a", 8, 1) is F  # or comes back after a restart
    g.forget("never-heard")  # no error


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"max_senders": 0}])
def test_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ReplayGuard(**kwargs)

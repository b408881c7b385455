"""Lifeguard suspicion timer: confirmations shrink the timeout on a log scale."""
from __future__ import annotations

import math

import pytest

from meshlb.cluster.protocol_config import ProtocolConfig, suspicion_bounds
from meshlb.cluster.suspicion import Suspicion, suspicion_timeout


def test_timeout_formula_endpoints_and_monotonic():
    lo, hi, k = 6.0, 36.0, 3
    assert suspicion_timeout(0, k, lo, hi) == hi
    assert suspicion_timeout(k, k, lo, hi) == lo
    values = [suspicion_timeout(c, k, lo, hi) for c in range(k + 1)]
    assert values == sorted(values, reverse=True) and len(set(values)) == k + 1
    # log scale: the first confirmation buys the most
    assert values[0] - values[1] > values[1] - values[2] > values[2] - values[3]
    assert suspicion_timeout(1, k, lo, hi) == pytest.approx(hi - (hi - lo) * math.log(2) / math.log(4))
    assert suspicion_timeout(10, k, lo, hi) == lo  # never below min


def test_without_expected_confirmations_the_timeout_is_min():
    s = Suspicion(origin="a", incarnation=0, start=100.0, k=0, min_timeout=5.0, max_timeout=30.0)
    assert s.deadline == 105.0
    assert not s.confirm("b")


def test_confirmations_shrink_the_deadline_and_count_each_origin_once():
    s = Suspicion(origin="a", incarnation=3, start=100.0, k=2, min_timeout=6.0, max_timeout=36.0)
    assert s.deadline == 136.0
    assert not s.confirm("a")  # the accuser does not confirm itself
    assert s.confirm("b")
    d1 = s.deadline
    assert 106.0 < d1 < 136.0
    assert not s.confirm("b")
    assert s.deadline == d1
    assert s.confirm("c")
    assert s.deadline == 106.0
    assert not s.confirm("d")  # already at k: nothing more to gain
    assert s.confirmations == 2


def test_late_confirmation_can_make_the_deadline_due_at_once():
    s = Suspicion(origin="a", incarnation=0, start=0.0, k=1, min_timeout=5.0, max_timeout=30.0)
    assert s.remaining(20.0) == 10.0
    s.confirm("b")
    assert s.remaining(20.0) == 0.0


def test_bounds_scale_with_log10_of_cluster_size():
    cfg = ProtocolConfig.lan()
    lo100, hi100 = suspicion_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, 100, cfg.probe_interval)
    lo1000, _ = suspicion_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, 1000, cfg.probe_interval)
    assert lo100 == pytest.approx(cfg.suspicion_mult * 2 * cfg.probe_interval)
    assert hi100 == pytest.approx(cfg.suspicion_max_timeout_mult * lo100)
    assert lo1000 == pytest.approx(lo100 * 1.5)
    # tiny clusters still get at least alpha probe intervals
    lo1, _ = suspicion_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, 1, cfg.probe_interval)
    assert lo1 == pytest.approx(cfg.suspicion_mult * cfg.probe_interval)

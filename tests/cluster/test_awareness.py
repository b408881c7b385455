"""Local health awareness: bounded score that scales probe interval and timeout."""
from __future__ import annotations

import pytest

from meshlb.cluster.awareness import Awareness


def test_score_is_clamped_to_zero_and_max_minus_one():
    a = Awareness(8)
    assert a.apply(-3) == 0
    assert a.apply(5) == 5
    assert a.apply(10) == 7
    assert a.apply(-2) == 5


def test_scale_multiplies_by_score_plus_one():
    a = Awareness(4)
    assert a.scale(0.5) == 0.5
    a.apply(2)
    assert a.scale(0.5) == 1.5
    a.apply(100)
    assert a.scale(1.0) == 4.0


def test_max_one_disables_awareness():
    a = Awareness(1)
    a.apply(10)
    assert a.score == 0 and a.scale(2.0) == 2.0


def test_invalid_max():
    with pytest.raises(ValueError):
        Awareness(0)


# ---- in a Node ------------------------------------------------------------------------------

def test_refuting_a_suspicion_about_self_raises_awareness_and_probe_success_lowers_it():
    from meshlb.cluster import messages as M
    from tests.cluster.memnet import Network, converged, run_until, seal

    net = Network(seed=40)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n01"]
    assert a.awareness.score == 0
    a.handle_datagram(net.now, seal("n00", [M.encode(M.Suspect("n01", 0, "n00"))], epoch=50), net.addr(0))
    assert a.awareness.score == 1 and a.incarnation == 1
    net.run(3.0)  # healthy probes pay it back
    assert a.awareness.score == 0


def test_missing_nacks_blame_ourselves_but_nacks_do_not():
    from tests.cluster.memnet import Network, converged, run_until

    net = Network(seed=41)
    net.cluster(5)
    run_until(net, lambda: converged(net), limit=5.0)
    net.crash("n04")
    # every helper answers with a nack: the target is down, not us
    run_until(net, lambda: net.nodes["n00"].stats["probe_failures"] >= 1, limit=10.0)
    assert net.nodes["n00"].awareness.score == 0

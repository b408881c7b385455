"""The deterministic backend-usable rule."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlb.cluster.health_view import is_usable, usable_backends
from meshlb.cluster.membership import MemberView
from meshlb.cluster.messages import MemberMeta, Status


def mv(name, status=Status.ALIVE, healthy=True, obs=None) -> MemberView:
    return MemberView(name, ("10.0.0.1", 1), status, 0, MemberMeta(app_healthy=healthy, observations=obs or {}), 0.0)


def test_only_alive_and_self_healthy_members_are_usable_sorted():
    view = [mv("c"), mv("a"), mv("b", Status.SUSPECT), mv("d", Status.DEAD), mv("e", Status.LEFT),
            mv("f", healthy=False)]
    assert usable_backends(view) == ["a", "c"]


def test_strict_majority_of_other_alive_members_takes_a_backend_out():
    # 5 alive: x and 4 others; 2 down reports is not more than half of 4, 3 is
    two = [mv("x"), mv("a", obs={"x": False}), mv("b", obs={"x": False}), mv("c"), mv("d")]
    assert "x" in usable_backends(two)
    three = [mv("x"), mv("a", obs={"x": False}), mv("b", obs={"x": False}), mv("c", obs={"x": False}), mv("d")]
    assert "x" not in usable_backends(three)


def test_reports_that_do_not_count():
    view = [
        mv("x", obs={"x": False}),  # about itself: its app_healthy says it
        mv("a", obs={"x": True, "ghost": False}),  # True counts for nothing; unknown target ignored
        mv("s", Status.SUSPECT, obs={"x": False}),  # only alive observers
        mv("dd", Status.DEAD, obs={"x": False}),
    ]
    assert usable_backends(view) == ["a", "x"]


def test_one_observer_cannot_overrule_from_three_members_up():
    assert usable_backends([mv("a", obs={"c": False}), mv("b"), mv("c")]) == ["a", "b", "c"]
    # with two members the other one is the majority
    assert usable_backends([mv("a", obs={"b": False}), mv("b")]) == ["a"]
    assert is_usable(1, 2) and not is_usable(2, 3) and is_usable(0, 0) and not is_usable(1, 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 12))
def test_same_view_in_any_order_gives_the_same_answer(seed, n):
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(n)]
    view = []
    for name in names:
        status = rng.choice([Status.ALIVE, Status.ALIVE, Status.ALIVE, Status.SUSPECT, Status.DEAD])
        obs = {t: rng.random() < 0.7 for t in rng.sample(names, rng.randrange(n + 1))}
        view.append(mv(name, status, rng.random() < 0.9, obs))
    expect = usable_backends(view)
    shuffled = view[:]
    rng.shuffle(shuffled)
    assert usable_backends(shuffled) == expect == sorted(expect)
    # and it matches the rule written out longhand
    alive = [v for v in view if v.status is Status.ALIVE]
    longhand = sorted(
        v.name for v in alive if v.meta.app_healthy
        and not 2 * sum(1 for o in alive if o.name != v.name and o.meta.observations.get(v.name) is False)
        > len(alive) - 1)
    assert expect == longhand

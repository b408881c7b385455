"""The L2 owner function: one owner per VIP from the same view on every mix, sticky,
spread by rendezvous ranking, and a hand-over that never leaves a VIP unanswered."""
from __future__ import annotations

import itertools
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlb.announce.ownership import conflicts, held, owners, rank

VIPS = [f"198.19.0.{i}" for i in range(1, 41)]
MEMBERS = ["mix1", "mix2", "mix3", "mix4"]


def everyone(members=MEMBERS, vips=VIPS):
    return {m: set(vips) for m in members}


def test_nobody_claims_the_top_of_the_ranking_takes_each_vip_and_vips_spread():
    got = owners(VIPS, everyone(), {})
    for vip, owner in got.items():
        assert owner == max(MEMBERS, key=lambda m: rank(vip, m))
    counts = {m: sum(1 for o in got.values() if o == m) for m in MEMBERS}
    assert all(c >= 4 for c in counts.values()), counts  # 40 VIPs over 4 members


def test_rank_is_the_same_in_another_process():
    """No per-process hash seed: every mix ranks alike."""
    code = "from meshlb.announce.ownership import rank; print(rank('198.19.0.1', 'mix2').hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PYTHONPATH": "."}).stdout.strip()
    assert out == rank("198.19.0.1", "mix2").hex()


def test_a_claimant_keeps_its_vip_when_a_higher_ranked_member_comes_back():
    vip = VIPS[0]
    top = max(MEMBERS, key=lambda m: rank(vip, m))
    holder = next(m for m in MEMBERS if m != top)
    # top was away; holder took the VIP; top is back
    assert owners([vip], everyone(), {holder: {vip}})[vip] == holder
    assert held(top, [vip], everyone(), {holder: {vip}}, set()) == frozenset()
    assert held(holder, [vip], everyone(), {holder: {vip}}, {vip}) == {vip}


def test_the_owner_that_fails_is_replaced_by_the_top_survivor():
    vip = VIPS[3]
    first = owners([vip], everyone(), {})[vip]
    survivors = {m: set(VIPS) for m in MEMBERS if m != first}
    # its claim is still in its last metadata, but it is no candidate any more
    second = owners([vip], survivors, {first: {vip}})[vip]
    assert second == max(survivors, key=lambda m: rank(vip, m))
    assert held(second, [vip], survivors, {first: {vip}}, set()) == {vip}


def test_two_claimants_after_a_partition_resolve_alike_on_both_sides():
    vip = VIPS[5]
    a, b = "mix1", "mix3"
    claims = {a: {vip}, b: {vip}}
    winner = max((a, b), key=lambda m: rank(vip, m))
    loser = b if winner == a else a
    assert owners([vip], everyone(), claims)[vip] == winner
    assert held(winner, [vip], everyone(), claims, {vip}) == {vip}
    assert held(loser, [vip], everyone(), claims, {vip}) == frozenset()
    assert conflicts([vip], everyone(), claims) == {vip: sorted([a, b])}


def test_a_member_that_may_not_own_keeps_the_vip_until_a_successor_claims_it():
    vip = VIPS[0]
    owner = owners([vip], everyone(), {})[vip]
    leaving = dict(everyone())
    leaving[owner] = set()  # it leaves: no candidate any more
    # nobody else claims yet: it keeps answering
    assert held(owner, [vip], leaving, {owner: {vip}}, {vip}) == {vip}
    successor = owners([vip], leaving, {owner: {vip}})[vip]
    assert successor != owner
    assert held(successor, [vip], leaving, {owner: {vip}}, set()) == {vip}
    # the successor's claim arrives: the leaver releases
    claims = {owner: {vip}, successor: {vip}}
    assert held(owner, [vip], leaving, claims, {vip}) == frozenset()
    # and no candidate at all: nobody is made owner, the holder keeps it
    assert owners([vip], {owner: set()}, {owner: {vip}})[vip] is None
    assert held(owner, [vip], {owner: set()}, {owner: {vip}}, {vip}) == {vip}


def test_a_vip_only_some_members_forward_goes_to_one_of_them():
    vip = VIPS[0]
    cands = {"mix1": set(), "mix2": {vip}, "mix3": set()}
    assert owners([vip], cands, {"mix1": {vip}})[vip] == "mix2"  # mix1 claims but cannot forward it


def _converge(members, vips, holding, candidates, rounds=5):
    """Every member applies `held` to the same view (its claims as gossiped), round by round."""
    for _ in range(rounds):
        claims = {m: set(holding[m]) for m in holding}
        new = {m: set(held(m, vips, candidates, claims, holding[m])) for m in members}
        if new == holding:
            break
        holding = new
    return holding


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6), dead=st.sets(st.integers(0, 5)), seed_claims=st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 7)), max_size=20))
def test_members_sharing_a_view_converge_to_exactly_one_holder_per_vip(n, dead, seed_claims):
    members = [f"m{i}" for i in range(n)]
    vips = [f"10.0.0.{i}" for i in range(8)]
    alive = [m for i, m in enumerate(members) if i not in dead] or members[:1]
    candidates = {m: set(vips) for m in alive}
    # arbitrary starting claims, as after a partition heals
    holding = {m: set() for m in alive}
    for who, v in seed_claims:
        if who < n and members[who] in holding:
            holding[members[who]].add(vips[v])
    before = {v: [m for m in alive if v in holding[m]] for v in vips}
    final = _converge(alive, vips, holding, candidates)
    for v in vips:
        holders = [m for m in alive if v in final[m]]
        assert len(holders) == 1, (v, final)
        if before[v]:  # sticky: a VIP already claimed stays with one of its claimants
            assert holders[0] in before[v]
    # a member joining afterwards moves nothing
    joined = {**candidates, "new": set(vips)}
    final2 = _converge(alive + ["new"], vips, {**final, "new": set()}, joined)
    assert final2["new"] == set() and all(final2[m] == final[m] for m in alive)


def test_owner_is_independent_of_iteration_order():
    vip = VIPS[7]
    results = set()
    for perm in itertools.permutations(MEMBERS):
        cands = {m: {vip} for m in perm}
        results.add(owners([vip], cands, {})[vip])
    assert len(results) == 1

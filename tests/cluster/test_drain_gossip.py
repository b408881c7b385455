"""The cluster's drain map (meshlb/cluster/drain_gossip.py) in real Nodes over the
in-memory network: it reaches every member, outlives the member that wrote it, reaches
members that join or come back later, orders concurrent writes the same everywhere and
survives a restart of the whole cluster through what each member saved."""
from __future__ import annotations

import random

import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.drain_gossip import MAX_DRAIN_KEYS, DrainGossip, DrainsChanged
from meshlb.cluster.protocol_config import ProtocolConfig
from tests.cluster.memnet import Network, converged, run_until, seal

WALL = 1_795_533_400_000  # ms


def maps(net, names=None):
    return {n: net.nodes[n].drained() for n in (names or net.up)}


def agree(net, want):
    return all(d == want for d in maps(net).values())


def cluster(n=5, seed=1, loss=0.0):
    net = Network(seed=seed, loss=loss)
    net.cluster(n)
    run_until(net, lambda: converged(net), limit=10.0)
    return net


def test_a_drain_reaches_every_member_at_once_and_each_hears_of_it():
    net = cluster(5, loss=0.05)
    net.nodes["n02"].set_drain("member:n04", True, WALL, net.now)
    t = run_until(net, lambda: agree(net, {"member:n04"}), limit=5.0, step=0.01)
    assert t < 0.5  # gossiped at once, not at the next push-pull
    for n in net.up:
        changed = [e for e in net.events[n] if isinstance(e, DrainsChanged)]
        assert [e.keys for e in changed] == [("member:n04",)]
    net.nodes["n03"].set_drain("member:n04", False, WALL + 10, net.now)
    run_until(net, lambda: agree(net, frozenset()), limit=5.0, step=0.01)


def test_the_drain_outlives_the_member_that_wrote_it_and_reaches_later_joiners():
    net = cluster(4, seed=2)
    net.nodes["n01"].set_drain("server:192.0.2.21", True, WALL, net.now)
    run_until(net, lambda: agree(net, {"server:192.0.2.21"}), limit=5.0, step=0.01)
    net.crash("n01")
    net.run(5.0)
    # a member that joins after the writer died learns it from the join's push-pull
    late = net.add("late", 9, peers=[net.addr(2)])
    run_until(net, lambda: late.drained() == {"server:192.0.2.21"}, limit=5.0)
    assert net.nodes["n00"].drain_entries()[0].origin == "n01"


def test_concurrent_writes_end_the_same_everywhere():
    """A drain and an undrain of one key written on two members before either heard of
    the other: the larger (stamp, origin) wins on every member."""
    net = cluster(5, seed=3, loss=0.1)
    net.nodes["n01"].set_drain("member:n00", True, WALL, net.now)
    net.nodes["n03"].set_drain("member:n00", False, WALL, net.now)  # same ms: origin decides
    run_until(net, lambda: len({frozenset(d) for d in maps(net).values()}) == 1, limit=10.0)
    assert agree(net, frozenset())  # "n03" > "n01"
    entries = {n: net.nodes[n].drain_entries() for n in net.up}
    assert len({tuple(e) for e in entries.values()}) == 1


def test_a_write_after_seeing_another_wins_whatever_the_clocks():
    net = cluster(3, seed=4)
    net.nodes["n00"].set_drain("member:n02", True, WALL, net.now)
    run_until(net, lambda: agree(net, {"member:n02"}), limit=5.0, step=0.01)
    # n01's clock is a minute behind, but it saw the drain: its undrain comes after it
    e = net.nodes["n01"].set_drain("member:n02", False, WALL - 60_000, net.now)
    assert e.stamp == WALL + 1
    run_until(net, lambda: agree(net, frozenset()), limit=5.0, step=0.01)


def test_halves_of_a_partition_converge_when_it_heals():
    net = cluster(4, seed=5)
    a, b = {"n00", "n01"}, {"n02", "n03"}
    net.cut |= {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
    net.nodes["n00"].set_drain("member:n03", True, WALL, net.now)
    net.nodes["n02"].set_drain("server:192.0.2.9", True, WALL + 5, net.now)
    net.run(2.0)
    assert maps(net, a) == {n: {"member:n03"} for n in a}
    assert maps(net, b) == {n: {"server:192.0.2.9"} for n in b}
    net.cut.clear()
    run_until(net, lambda: agree(net, {"member:n03", "server:192.0.2.9"}), limit=60.0)


def test_the_whole_cluster_restarted_keeps_its_drains_and_a_stale_copy_loses():
    net = cluster(3, seed=6)
    net.nodes["n00"].set_drain("member:n01", True, WALL, net.now)
    net.nodes["n00"].set_drain("member:n02", True, WALL, net.now)
    run_until(net, lambda: agree(net, {"member:n01", "member:n02"}), limit=5.0, step=0.01)
    saved = {n: net.nodes[n].drain_entries() for n in net.up}
    # n02 goes down with its copy; meanwhile n01 is undrained
    net.crash("n02")
    net.nodes["n01"].set_drain("member:n01", False, WALL + 1000, net.now)
    net.run(1.0)
    for n in ("n00", "n01"):
        saved[n] = net.nodes[n].drain_entries()
        net.crash(n)
    # every agent restarts (new incarnations), each with the map it saved
    for i, n in enumerate(("n00", "n01", "n02")):
        node = net.add(n, i, peers=[net.addr(0)] if i else [], incarnation=100, join=False)
        assert node.restore_drains(saved[n]) == len(saved[n])
        node.join(net.now)
        net.collect(n)
    run_until(net, lambda: converged(net) and agree(net, {"member:n02"}), limit=60.0)


def test_a_member_back_from_the_dead_gets_the_map_at_once():
    cfg = ProtocolConfig.lan()
    net = Network(seed=7, config=cfg)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=10.0)
    net.cut |= {("n02", "n00"), ("n02", "n01"), ("n00", "n02"), ("n01", "n02")}
    net.nodes["n00"].set_drain("member:n01", True, WALL, net.now)
    net.run(8.0)
    assert net.nodes["n02"].drained() == frozenset()
    net.cut.clear()
    # not at the next push-pull (30 s) or reconnection (10 s): the map goes to a member
    # at its return (0.15-0.6 s here, 8-10 s without)
    run_until(net, lambda: agree(net, {"member:n01"}), limit=2.0, step=0.01)


def test_hostile_entries_are_bounded_and_malformed_ones_dropped():
    net = cluster(2, seed=8)
    n0 = net.nodes["n00"]
    before = n0.stats["drop.malformed"]
    net.inject("n00", seal("n01", [[M.T_DRAINS, [["member:x", "yes", 1, "n01"]]]]), net.addr(1))
    net.run(0.1)
    assert n0.stats["drop.malformed"] == before + 1 and n0.drained() == frozenset()
    g = DrainGossip(name="x", config=ProtocolConfig.lan())
    g.restore(M.DrainEntry(f"member:m{i}", i % 2 == 0, i, "o") for i in range(MAX_DRAIN_KEYS + 10))
    assert len(g.entries()) == MAX_DRAIN_KEYS
    # the undrained keys went first, the oldest of them
    assert "member:m1" not in {e.key for e in g.entries()} and "member:m0" in g.drained()


def test_the_map_rides_in_datagrams_of_its_size():
    g = DrainGossip(name="x", config=ProtocolConfig.lan())
    net = Network(seed=9)
    node = net.add("n", 0)
    g.attach(node, net.now)
    rng = random.Random(1)
    g.restore(M.DrainEntry(f"server:2001:db8::{rng.getrandbits(32):x}", True, i, "origin-" + "o" * 40)
              for i in range(300))
    msgs = g.local_state(net.now, join=False, reply=True)
    assert len(msgs) > 1 and all(len(m) <= node.capacity for m in msgs)
    got = [e for m in msgs for e in M.decode_received(m).entries]
    assert got == g.entries()


@pytest.mark.parametrize("bad", ["", "a\nb", "k" * 129])
def test_bad_keys_are_refused(bad):
    net = Network(seed=10)
    node = net.add("n", 0)
    with pytest.raises(ValueError):
        node.set_drain(bad, True, WALL, net.now)

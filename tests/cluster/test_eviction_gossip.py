"""Multi-member tests of eviction dissemination (eviction_gossip.py) in Nodes over the
in-memory network (memnet.py): gossip and group delivery, evictions_sent_through,
marks, digest repair, relaying, runs of flow records."""
from __future__ import annotations

from collections import Counter

import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.node import GROUP, EvictionReceived, EvictionsReceived, FlowTuple, MemberMeta, Status
from meshlb.cluster.protocol_config import ProtocolConfig
from tests.cluster.memnet import Network, converged, flow, make_wire, run_until

# ---- evictions ------------------------------------------------------------------------------

def received(net: Network, name: str) -> Counter:
    return Counter((e.origin, e.seq, e.tuple) for e in net.events[name] if isinstance(e, EvictionReceived))


def test_evictions_reach_everyone_once_by_gossip_under_loss():
    net = Network(seed=19, loss=0.05)
    net.cluster(15)
    run_until(net, lambda: converged(net), limit=10.0)
    published = []
    for i in range(60):
        origin = f"n{i % 15:02d}"
        net.nodes[origin].publish_eviction(flow(i), net.now)
        net.collect(origin)
        published.append((origin, flow(i)))
        net.run(0.01)
    net.run(1.5)
    pairs = sum(1 for o in net.up for orig, _ in published if orig != o)
    got_by_gossip = sum(len(received(net, o)) for o in net.up)
    # gossip alone: nearly everything within a second and a half...
    assert got_by_gossip >= 0.99 * pairs
    # ...and the periodic eviction digest repairs the rare miss within seconds
    net.run(2 * net.config.eviction_sync_interval)
    for o in net.up:
        got = received(net, o)
        assert set(got.values()) <= {1}, "an eviction was delivered twice"
        expect = {(orig, f) for orig, f in published if orig != o}
        assert {(orig, f) for orig, _, f in got} == expect
    dup = sum(net.nodes[o].stats["evictions_duplicate"] for o in net.up)
    assert dup > 0  # the epidemic did deliver copies, and they were suppressed


def test_evictions_are_batched_and_go_to_group_immediately():
    net = Network(seed=20, group=True)
    net.cluster(4)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    for i in range(100):
        a.publish_eviction(flow(i), net.now)
    out = a.take_outgoing()
    group = [o for o in out if o.dest is GROUP]
    assert 1 <= len(group) <= 5  # 100 evictions of ~40 B: a few full datagrams, not 100
    w = make_wire("n01")
    n = sum(len(w.open(net.now, o.data, a.address).messages) for o in group)
    assert n == 100


def test_evictions_sent_through_follows_the_first_datagram_of_each_eviction():
    net = Network(seed=22)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    before = a.evictions_sent_through()
    seqs = [a.publish_eviction(flow(i), net.now) for i in range(3)]
    assert seqs == [before + 1, before + 2, before + 3]
    assert a.evictions_sent_through() == before  # queued, in no datagram yet
    net.collect("n00")
    assert a.evictions_sent_through() == before
    net.run(0.1)  # the expedited gossip round goes out
    assert a.evictions_sent_through() == seqs[-1]
    net.run(0.1)
    assert {(o, f) for o, _, f in received(net, "n01")} >= {("n00", flow(i)) for i in range(3)}


def test_evictions_sent_through_does_not_wait_for_nobody():
    net = Network(seed=23)
    net.cluster(1)
    a = net.nodes["n00"]
    run_until(net, lambda: a.joined, limit=2.0)
    s = a.publish_eviction(flow(1), net.now)
    assert a.evictions_sent_through() == s  # a cluster of one: no datagram will carry it


def test_evictions_sent_through_waits_while_the_join_is_unanswered():
    net = Network(seed=24)
    net.cluster(2)
    run_until(net, lambda: converged(net), limit=5.0)
    # a restarted member, its seed not answering yet: what it publishes must wait
    net.cut |= {("n00", "n09"), ("n09", "n00")}
    b = net.add("n09", 9, peers=[net.addr(0)], incarnation=5)
    s = b.publish_eviction(flow(7), net.now)
    net.run(0.5)
    assert not b.joined and b.evictions_sent_through() == s - 1
    net.cut.clear()
    run_until(net, lambda: b.evictions_sent_through() == s, limit=5.0)
    run_until(net, lambda: ("n09", s, flow(7)) in received(net, "n00"), limit=5.0)


def test_unsent_evictions_stay_bounded_when_nobody_asks():
    net = Network(seed=25)
    net.cluster(1)
    b = net.add("n09", 9, peers=[net.addr(5)])  # its seed never answers: nothing goes out
    for i in range(3 * net.config.broadcast_queue_max):
        b.publish_eviction(flow(i), net.now)
    assert len(b.evictions._unsent) <= net.config.broadcast_queue_max + 1
    # those the full queue dropped will never go: they no longer hold the mark back
    assert b.evictions_sent_through() >= 2 * net.config.broadcast_queue_max - 1


def test_missed_evictions_are_repaired_by_push_pull():
    cfg = ProtocolConfig.lan(push_pull_interval=2.0)
    net = Network(seed=21, config=cfg)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    # n05 hears nothing about evictions for a while: cut every link to it, publish, heal
    others = net.up - {"n05"}
    net.cut |= {(o, "n05") for o in others}
    for i in range(10):
        net.nodes["n01"].publish_eviction(flow(i), net.now)
        net.collect("n01")
        net.run(0.05)
    net.run(3.0)  # gossip retransmits are spent by now
    assert not received(net, "n05")
    net.cut.clear()
    run_until(net, lambda: len(received(net, "n05")) == 10, limit=30.0)
    assert set(received(net, "n05").values()) == {1}
    assert sum(net.nodes[o].stats["evictions_repair_sent"] for o in others) >= 10


def _publish(net: Network, origin: str, flows) -> None:
    for f in flows:
        net.nodes[origin].publish_eviction(f, net.now)
        net.collect(origin)
        net.run(0.02)


def test_restarted_member_resumes_its_marks_and_gets_exactly_the_downtime_evictions():
    # a long anti-entropy interval: only the join itself can bring the missed ones
    cfg = ProtocolConfig.lan(push_pull_interval=300.0, eviction_sync_interval=300.0)
    net = Network(seed=31, config=cfg)
    net.cluster(4)
    run_until(net, lambda: converged(net), limit=5.0)
    _publish(net, "n01", [flow(i) for i in range(5)])
    run_until(net, lambda: len(received(net, "n03")) == 5, limit=5.0)
    marks = net.nodes["n03"].eviction_marks()
    assert [(e.origin, e.contiguous) for e in marks] == [("n01", 5)]
    net.crash("n03")  # the agent is killed; its conntrack state stays pinned
    _publish(net, "n01", [flow(i) for i in range(5, 12)])
    net.run(2.0)
    restarted = net.add("n03", 3, peers=[net.addr(0)], incarnation=77, join=False)
    restarted.restore_eviction_marks(marks, net.now)
    restarted.join(net.now)
    net.collect("n03")
    run_until(net, lambda: len(received(net, "n03")) >= 12, limit=5.0)
    net.run(2.0)
    got = received(net, "n03")
    # the seven published while it was down arrived, after the restart: n03's events
    # list spans both lives, and no eviction came twice
    assert {seq for (_, seq, _) in got} == set(range(1, 13)) and set(got.values()) == {1}


def test_fresh_joiner_without_marks_takes_the_seed_marks_and_no_old_evictions():
    cfg = ProtocolConfig.lan(push_pull_interval=300.0, eviction_sync_interval=300.0)
    net = Network(seed=32, config=cfg)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    _publish(net, "n01", [flow(i) for i in range(6)])
    net.run(1.0)
    net.add("n03", 3, peers=[net.addr(0)], incarnation=5)
    run_until(net, lambda: converged(net), limit=5.0)
    net.run(2.0)
    assert not received(net, "n03")
    assert [(e.origin, e.contiguous) for e in net.nodes["n03"].eviction_marks()] == [("n01", 6)]


def test_members_back_from_a_cut_exchange_what_they_missed_at_once():
    # anti-entropy and the periodic digest far away: the exchange must come from the
    # members seeing each other alive again
    cfg = ProtocolConfig.lan(push_pull_interval=300.0, eviction_sync_interval=300.0,
                             dead_reap_interval=300.0)
    net = Network(seed=33, config=cfg)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    others = {"n00", "n01"}
    net.cut |= {(o, "n02") for o in others} | {("n02", o) for o in others}
    run_until(net, lambda: net.status("n00", "n02") is Status.DEAD, limit=30.0)
    _publish(net, "n01", [flow(i) for i in range(8)])
    _publish(net, "n02", [flow(100 + i) for i in range(4)])
    net.run(3.0)  # every retransmission is spent against the cut
    assert not received(net, "n02") and not [k for k in received(net, "n00") if k[0] == "n02"]
    net.cut.clear()
    took = run_until(net, lambda: len(received(net, "n02")) == 8
                     and len([k for k in received(net, "n00") if k[0] == "n02"]) == 4, limit=15.0)
    assert took < 12.0  # the reconnect timer is 10 s; the exchange follows it at once
    assert sum(net.nodes[n].stats["eviction_digests_on_rejoin"] for n in net.nodes) > 0


def test_small_cluster_does_not_relay_evictions_the_origin_sends_to_everyone():
    net = Network(seed=34)
    net.cluster(4)  # 3 others <= gossip_nodes (4): the origin reaches all each round
    run_until(net, lambda: converged(net), limit=5.0)
    _publish(net, "n00", [flow(i) for i in range(20)])
    net.run(3.0)
    for o in ("n01", "n02", "n03"):
        assert len(received(net, o)) == 20
        st = net.nodes[o].stats
        # one copy each: a round that reaches everyone sends an eviction in that round
        # only (a second round would repeat all 20; a digest sync may repeat one)
        assert st["evictions_not_relayed"] == 20 and st.get("evictions_duplicate", 0) <= 2
    # nobody but the origin sent them on: the origin heard none of its own back
    assert net.nodes["n00"].stats.get("evictions_duplicate", 0) == 0


def test_a_round_to_everyone_is_sealed_once_and_each_member_takes_it_once():
    net = Network(seed=36)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    origin = net.nodes["n00"]
    origin.publish_evictions([flow(i) for i in range(30)], net.now)
    origin.tick(origin.next_deadline())  # the expedited round
    out = origin.take_outgoing()
    by_dest: dict = {}
    for o in out:
        by_dest.setdefault(o.dest, []).append(o.data)
    assert set(by_dest) == {net.addr(1), net.addr(2)}
    assert by_dest[net.addr(1)] == by_dest[net.addr(2)]  # one sealing, same bytes to both
    for i in (1, 2):
        node = net.nodes[f"n{i:02d}"]
        for d in by_dest[net.addr(i)]:
            node.handle_datagram(net.now, d, net.addr(0))
        got = [e for e in node.take_events() if isinstance(e, EvictionReceived)]
        assert len(got) == 30
        for d in by_dest[net.addr(i)]:  # the same datagram again, to the same member
            node.handle_datagram(net.now, d, net.addr(0))
        assert not node.take_events()
        assert node.stats["drop.replayed"] == len(by_dest[net.addr(i)])


def test_small_cluster_one_copy_per_member_is_repaired_under_loss():
    """With a single copy per member (the origin's round reaches everyone), a copy
    lost on the way is the eviction digest's to repair: every member gets every
    eviction within a few sync intervals, and none twice."""
    net = Network(seed=35, loss=0.1)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=10.0)
    for i in range(200):
        origin = f"n{i % 3:02d}"
        net.nodes[origin].publish_eviction(flow(i), net.now)
        net.collect(origin)
        net.run(0.005)
    net.run(1.0)
    pairs = 2 * 200
    by_gossip = sum(len(received(net, o)) for o in net.up)
    assert 0.8 * pairs <= by_gossip < pairs  # about a tenth lost: one copy each
    took = run_until(net, lambda: sum(len(received(net, o)) for o in net.up) == pairs,
                     limit=6 * net.config.eviction_sync_interval)
    assert took <= 6 * net.config.eviction_sync_interval
    for o in net.up:
        assert set(received(net, o).values()) == {1}


def test_large_cluster_relays_evictions():
    net = Network(seed=35)
    net.cluster(8)  # 7 others > gossip_nodes: epidemic relaying is needed
    run_until(net, lambda: converged(net), limit=10.0)
    _publish(net, "n00", [flow(i) for i in range(5)])
    run_until(net, lambda: all(len(received(net, o)) == 5 for o in net.up if o != "n00"), limit=10.0)
    assert sum(net.nodes[o].stats["evictions_not_relayed"] for o in net.up) == 0


def test_publish_evictions_skips_and_counts_what_it_refuses():
    net = Network(seed=36)
    net.cluster(2)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    last = a.publish_evictions([flow(1), FlowTuple("1.2.3.4", 1, "10.0.0.1", 80, 1), flow(2),
                                FlowTuple("not-an-ip", 1, "10.0.0.1", 80, 6)], net.now)
    assert last == 2 and a.stats["evictions_refused"] == 2
    assert a.publish_evictions([], net.now) == 0
    net.collect("n00")
    run_until(net, lambda: len(received(net, "n01")) == 2, limit=5.0)


def test_publish_eviction_validates_the_tuple():
    net = Network()
    (a,) = net.cluster(1)
    with pytest.raises(ValueError):
        a.publish_eviction(FlowTuple("1.2.3.4", 1, "10.0.0.1", 80, 1), net.now)
    with pytest.raises(ValueError):
        a.publish_eviction(FlowTuple("not-an-ip", 1, "10.0.0.1", 80, 6), net.now)


# ---- evictions in runs ----------------------------------------------------------------------

def records(net: Network, name: str) -> Counter:
    """(origin, seq, flow) of every eviction ``name`` received, single or in a run."""
    out = received(net, name)
    for e in net.events[name]:
        if isinstance(e, EvictionsReceived):
            out.update(zip([e.origin] * len(e.seqs), e.seqs, e.tuples()))
    return out


def test_evictions_published_as_records_go_in_runs_to_every_member():
    net = Network(seed=40)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    flows = [flow(i) for i in range(100)] + [FlowTuple("2001:db8::7", 9, "2001:db8::1", 443, 17)]
    last = a.publish_eviction_records([M.flow_record(f) for f in flows], net.now)
    assert last == 101
    net.collect("n00")
    net.run(1.0)
    per_run = a.evictions.run_capacity()
    assert per_run >= 16
    assert a.stats["eviction_runs_sent"] == -(-101 // per_run)
    for o in ("n01", "n02"):
        got = records(net, o)
        assert got == Counter(("n00", i + 1, f) for i, f in enumerate(flows))
        assert not received(net, o)  # no single ones
        runs = [e for e in net.events[o] if isinstance(e, EvictionsReceived)]
        assert all(r.records[i] == M.flow_record(t) for r in runs for i, t in enumerate(r.tuples()))
    assert a.evictions_sent_through() == 101


def test_records_go_as_single_evictions_while_an_older_member_is_live():
    net = Network(seed=41)
    net.add("n00", 0)
    net.add("n01", 1, peers=[net.addr(0)])
    net.add("n02", 2, peers=[net.addr(0)], meta=MemberMeta(version=M.RUNS_VERSION - 1))
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    a.publish_eviction_records([M.flow_record(flow(i)) for i in range(10)], net.now)
    net.collect("n00")
    net.run(1.0)
    assert a.stats.get("eviction_runs_sent", 0) == 0
    for o in ("n01", "n02"):  # the older one understands these
        assert received(net, o) == Counter(("n00", i + 1, flow(i)) for i in range(10))
    net.crash("n02")
    run_until(net, lambda: net.status("n00", "n02") is Status.DEAD, limit=30.0)
    a.publish_eviction_records([M.flow_record(flow(i)) for i in range(10, 20)], net.now)
    net.collect("n00")
    net.run(1.0)
    assert a.stats["eviction_runs_sent"] >= 1  # every live member takes runs now
    assert records(net, "n01") == Counter(("n00", i + 1, flow(i)) for i in range(20))


def test_runs_lost_on_the_way_are_repaired_and_none_arrives_twice():
    net = Network(seed=42, loss=0.2)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=10.0)
    want = Counter()
    for b in range(20):
        origin = f"n{b % 3:02d}"
        node = net.nodes[origin]
        batch = [flow(1000 * b + i) for i in range(40)]
        last = node.publish_eviction_records([M.flow_record(f) for f in batch], net.now)
        want.update((origin, last - 40 + 1 + i, f) for i, f in enumerate(batch))
        net.collect(origin)
        net.run(0.05)
    net.run(6 * net.config.eviction_sync_interval)
    for o in net.up:
        got = records(net, o)
        assert set(got.values()) == {1}  # none twice
        assert set(got) == {k for k in want if k[0] != o}


def test_large_cluster_relays_runs():
    net = Network(seed=43)
    net.cluster(8)
    run_until(net, lambda: converged(net), limit=10.0)
    net.nodes["n00"].publish_eviction_records([M.flow_record(flow(i)) for i in range(50)], net.now)
    net.collect("n00")
    run_until(net, lambda: all(len(records(net, o)) == 50 for o in net.up if o != "n00"), limit=10.0)
    assert all(set(records(net, o).values()) == {1} for o in net.up if o != "n00")


def test_a_relay_sends_a_run_singly_while_it_knows_an_older_member():
    net = Network(seed=45)
    net.cluster(8)
    net.add("n08", 8, peers=[net.addr(1)], meta=MemberMeta(version=M.RUNS_VERSION - 1))
    run_until(net, lambda: converged(net), limit=10.0)
    origin = net.nodes["n00"]
    # the origin has not heard of the older member yet (it joined a moment ago), and
    # reaches it only through relays
    origin.evictions._runs_welcome = lambda: True
    net.cut.add(("n00", "n08"))
    origin.publish_eviction_records([M.flow_record(flow(i)) for i in range(50)], net.now)
    net.collect("n00")
    assert origin.stats["eviction_runs_sent"] >= 1
    run_until(net, lambda: len(received(net, "n08")) == 50, limit=net.config.eviction_sync_interval / 2)
    assert received(net, "n08") == Counter(("n00", i + 1, flow(i)) for i in range(50))
    assert not any(isinstance(e, EvictionsReceived) for e in net.events["n08"])  # no run reached it
    assert sum(net.nodes[o].stats["evictions_relayed_singly"] for o in net.up) >= 50


def test_publish_eviction_records_counts_and_skips_what_is_no_record():
    net = Network(seed=44)
    net.cluster(2)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    good = M.flow_record(flow(1))
    bad = [good[:-1], good[:36] + b"\x01" + good[37:], "x" * 40, None]
    assert a.publish_eviction_records([*bad, good], net.now) == 1
    assert a.stats["evictions_refused"] == len(bad)
    assert a.publish_eviction_records(bad, net.now) == 0

"""Multi-member tests of the membership engine, run in Nodes over the in-memory network
(memnet.py): join, failure detection, leave and rejoin, metadata, hostile input,
push-pull, partitions."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.keyring import Keyring
from meshlb.cluster.node import (
    GROUP,
    FlowTuple,
    MemberDead,
    MemberLeft,
    MemberMeta,
    MemberSuspect,
    MemberUp,
    MetaChanged,
    Node,
    Status,
)
from meshlb.cluster.protocol_config import ProtocolConfig
from meshlb.cluster.wire import Wire
from tests.cluster.memnet import KEY, LABEL, T0, Network, converged, flow, make_wire, run_until, seal

# ---- join -------------------------------------------------------------------------------

def test_join_through_seed_converges_and_agrees_on_backends():
    net = Network(seed=3, loss=0.01)
    net.cluster(10)
    t = run_until(net, lambda: converged(net), limit=10.0)
    assert t < 5.0
    backends = {tuple(net.nodes[n].usable_backends()) for n in net.up}
    assert backends == {tuple(sorted(net.up))}
    for n in net.up:
        assert net.nodes[n].joined
        # every other member produced exactly one MemberUp here
        ups = Counter(e.member.name for e in net.kinds(n, MemberUp))
        assert set(ups) == net.up - {n} and set(ups.values()) == {1}


def test_join_through_group_without_peers():
    net = Network(seed=4, group=True)
    net.cluster(8)
    run_until(net, lambda: converged(net), limit=10.0)
    assert all(net.nodes[n].joined for n in net.up)


def test_join_retries_until_seed_answers():
    net = Network(seed=5)
    a = net.add("a", 0, join=False)
    b = net.add("b", 1, peers=[net.addr(0)])
    net.crash("a")
    net.run(3.5)
    assert not b.joined
    assert b.stats["join_attempts"] >= 3
    net.up.add("a")
    run_until(net, lambda: b.joined and net.status("a", "b") is Status.ALIVE, limit=3.0)
    assert a.members() and net.status("b", "a") is Status.ALIVE


def test_seed_added_while_joining_is_tried_at_once():
    net = Network(seed=6)
    a = net.add("a", 0)
    b = net.add("b", 1, peers=[net.addr(5)])  # nobody there
    net.run(2.5)
    assert not b.joined
    b.add_peers([net.addr(0)], net.now)
    run_until(net, lambda: b.joined and net.status("a", "b") is Status.ALIVE, limit=0.2)
    assert a.members() and net.status("b", "a") is Status.ALIVE


def test_seed_added_to_a_member_alone_is_joined_by_reconnection():
    net = Network(seed=7)
    net.add("a", 0)
    b = net.add("b", 1)  # no seed: a cluster of one
    net.run(1.0)
    assert b.joined and len(b.members()) == 1
    b.add_peers([net.addr(0), net.addr(0)], net.now)
    run_until(net, lambda: converged(net), limit=net.config.reconnect_interval + 1.0)


# ---- failure detection --------------------------------------------------------------------

def test_crash_is_suspected_then_dead_everywhere_and_reaped():
    cfg = ProtocolConfig.lan(dead_reap_interval=10.0)
    net = Network(seed=6, loss=0.02, config=cfg)
    net.cluster(12)
    run_until(net, lambda: converged(net), limit=10.0)
    net.run(2.0)
    net.crash("n05")
    t = run_until(net, lambda: net.all_see("n05", Status.DEAD), limit=25.0)
    assert t < 15.0
    for o in net.up:
        assert net.kinds(o, MemberDead, "n05")
        assert "n05" not in net.nodes[o].usable_backends()
        # nobody else was declared dead
        assert {e.member.name for e in net.kinds(o, MemberDead)} == {"n05"}
    # the suspicion came first somewhere, and was gossiped
    assert any(net.kinds(o, MemberSuspect, "n05") for o in net.up)
    net.run(cfg.dead_reap_interval + 2.0)
    for o in net.up:
        assert net.status(o, "n05") is None


def test_suspect_is_not_usable_immediately():
    net = Network(seed=7)
    net.cluster(5)
    run_until(net, lambda: converged(net), limit=5.0)
    net.crash("n02")
    run_until(net, lambda: any(net.status(o, "n02") is Status.SUSPECT for o in net.up), limit=10.0)
    for o in net.up:
        if net.status(o, "n02") is Status.SUSPECT:
            assert "n02" not in net.nodes[o].usable_backends()


def test_no_false_deaths_under_loss():
    net = Network(seed=8, loss=0.05)
    net.cluster(15)
    run_until(net, lambda: converged(net), limit=15.0)
    net.run(60.0)
    for o in net.up:
        assert not net.kinds(o, MemberDead), o
    assert converged(net)


def test_indirect_probe_saves_member_behind_a_broken_link():
    net = Network(seed=9)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    net.cut |= {("n00", "n03"), ("n03", "n00")}
    net.run(30.0)
    s = net.nodes["n00"].stats
    assert s["indirect_probes"] > 0 and s["probe_acks_indirect"] > 0
    assert not net.kinds("n00", MemberDead)
    assert net.status("n00", "n03") is Status.ALIVE


def test_forged_suspicion_is_refuted():
    net = Network(seed=10)
    net.cluster(8)
    run_until(net, lambda: converged(net), limit=5.0)
    # n01 (an authenticated member) claims n03 is suspect; tell several members.
    forged = seal("n01", [M.encode(M.Suspect("n03", 0, "n01"))], epoch=99)
    for victim in ("n00", "n04", "n05"):
        net.inject(victim, forged, net.addr(1))
    net.run(0.01)
    assert net.status("n00", "n03") is Status.SUSPECT
    run_until(net, lambda: net.all_see("n03", Status.ALIVE), limit=5.0)
    assert net.nodes["n03"].incarnation == 1
    assert net.nodes["n03"].stats["refutations"] == 1
    net.run(20.0)
    assert all(not net.kinds(o, MemberDead) for o in net.up)
    assert all(net.view(o)["n03"] == (Status.ALIVE, 1) for o in net.up)


def test_forged_death_and_leave_about_a_live_member_are_refuted():
    net = Network(seed=11)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    forged = seal("n01", [M.encode(M.Dead("n02", 0, "n01")), M.encode(M.Left("n04", 0))], epoch=99)
    net.inject("n00", forged, net.addr(1))
    net.run(0.01)
    assert net.status("n00", "n02") is Status.DEAD and net.status("n00", "n04") is Status.LEFT
    run_until(net, lambda: net.all_see("n02", Status.ALIVE) and net.all_see("n04", Status.ALIVE), limit=10.0)
    assert net.nodes["n02"].incarnation >= 1 and net.nodes["n04"].incarnation >= 1


def test_buddy_rule_ping_to_suspect_carries_the_suspicion():
    net = Network(seed=12)
    a = net.add("a", 0)
    b = net.add("b", 1, peers=[net.addr(0)])
    run_until(net, lambda: converged(net), limit=5.0)
    a.handle_datagram(net.now, seal("zz", [M.encode(M.Suspect("b", b.incarnation, "zz"))]), ("10.9.9.9", 1))
    assert net.status("a", "b") is Status.SUSPECT
    a.take_events()
    # run a's timers alone until it probes b
    w = make_wire("b")
    while True:
        net.now = a.next_deadline()
        a.tick(net.now)
        outs = [o for o in a.take_outgoing() if o.dest == b.address]
        msgs = [M.decode(m) for o in outs for m in w.open(net.now, o.data, a.address).messages]
        pings = [i for i, m in enumerate(msgs) if isinstance(m, M.Ping)]
        if pings:
            break
    assert isinstance(msgs[pings[0] - 1], M.Suspect) and msgs[pings[0] - 1].name == "b"
    # and b, receiving that ping, refutes right away and gossips alive
    b.handle_datagram(net.now, outs[0].data, a.address)
    assert b.incarnation == 1 and b.stats["refutations"] == 1


# ---- leave and rejoin ---------------------------------------------------------------------

def test_graceful_leave_spreads_and_is_reaped():
    cfg = ProtocolConfig.lan(dead_reap_interval=5.0)
    net = Network(seed=13, config=cfg)
    net.cluster(8)
    run_until(net, lambda: converged(net), limit=5.0)
    inc = net.nodes["n04"].incarnation
    net.nodes["n04"].leave(net.now)
    net.collect("n04")
    run_until(net, lambda: net.all_see("n04", Status.LEFT), limit=2.0)
    net.crash("n04")
    for o in net.up:
        assert net.view(o)["n04"] == (Status.LEFT, inc + 1)
        assert net.kinds(o, MemberLeft, "n04") and not net.kinds(o, MemberDead)
    net.run(8.0)
    for o in net.up:
        assert net.status(o, "n04") is None


def test_rejoin_after_restart_with_higher_incarnation():
    cfg = ProtocolConfig.lan(dead_reap_interval=60.0)
    net = Network(seed=14, config=cfg)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    net.crash("n02")
    run_until(net, lambda: net.all_see("n02", Status.DEAD), limit=30.0)
    for o in net.up:
        net.events[o].clear()
    net.add("n02", 2, peers=[net.addr(0)], incarnation=50)
    run_until(net, lambda: converged(net), limit=5.0)
    for o in net.up - {"n02"}:
        assert net.view(o)["n02"] == (Status.ALIVE, 50)
        assert net.kinds(o, MemberUp, "n02")


def test_restart_with_stale_incarnation_refutes_its_old_life():
    net = Network(seed=15)
    net.cluster(5)
    run_until(net, lambda: converged(net), limit=5.0)
    forged = seal("n01", [M.encode(M.Suspect("n03", 0, "n01"))], epoch=99)
    net.inject("n00", forged, net.addr(1))
    run_until(net, lambda: net.all_see("n03", Status.ALIVE) and net.nodes["n03"].incarnation == 1, limit=5.0)
    net.crash("n03")
    run_until(net, lambda: net.all_see("n03", Status.DEAD), limit=30.0)
    # restarted with incarnation 0 (below what the cluster has: 1): it must overtake it
    net.add("n03", 3, peers=[net.addr(0)], incarnation=0)
    run_until(net, lambda: converged(net), limit=10.0)
    assert net.nodes["n03"].incarnation >= 2


# ---- metadata and health --------------------------------------------------------------------

def test_meta_change_spreads_and_changes_usable_backends():
    net = Network(seed=16)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    n1 = net.nodes["n01"]
    n1.update_meta(replace(n1.table.local.meta, app_healthy=False, table_digest="abc"), net.now)
    net.collect("n01")
    run_until(net, lambda: all("n01" not in net.nodes[o].usable_backends() for o in net.up), limit=3.0)
    for o in net.up - {"n01"}:
        assert net.kinds(o, MetaChanged, "n01")
        v = [m for m in net.nodes[o].members() if m.name == "n01"][0]
        assert v.meta.table_digest == "abc" and v.status is Status.ALIVE
    assert len({tuple(net.nodes[o].usable_backends()) for o in net.up}) == 1


def test_majority_of_observers_removes_backend_everywhere():
    net = Network(seed=17)
    net.cluster(5)
    run_until(net, lambda: converged(net), limit=5.0)
    for o in ("n00", "n01", "n02"):
        node = net.nodes[o]
        node.update_meta(replace(node.table.local.meta, observations={"n04": False}), net.now)
        net.collect(o)
    net.run(3.0)
    for o in net.up:
        assert net.nodes[o].usable_backends() == ["n00", "n01", "n02", "n03"]


def test_oversized_meta_is_refused():
    net = Network(seed=18)
    (a,) = net.cluster(1)
    big = MemberMeta(observations={f"member-{i:05d}": False for i in range(400)})
    with pytest.raises(ValueError):
        a.update_meta(big, net.now)
    assert a.incarnation == 0


# ---- hostile input --------------------------------------------------------------------------

def test_malformed_messages_are_counted_and_ignored():
    net = Network(seed=22)
    a, b = net.cluster(2)
    run_until(net, lambda: converged(net), limit=5.0)
    before = net.view("n00")
    bad = [
        [M.T_ALIVE, "x", "not-an-ip", 1, 0, 0, M.encode_meta(MemberMeta())],
        [M.T_SUSPECT, "n01", -1, "n00"],
        [M.T_PING, 1],
        "hello",
        [99, 1, 2],
        [M.T_EVICT, "n01", 0, 1, b"\x01\x02\x03", 1, b"\x0a\0\0\1", 80, 6],
        [M.T_EVICT, "n01", 0, 0, b"\x0a\0\0\2", 1, b"\x0a\0\0\1", 80, 6],  # seq 0
        [M.T_EVICT, "n01", 0, 1, b"\x0a\0\0\2", 1, b"\x0a\0\0\1", 80, 47],  # proto
        [M.T_EVICT, "n01", 0, 1, b"\x0a\0\0\2", False, b"\x0a\0\0\1", 80, 6],
        [M.T_EVICT, 7, 0, 1, b"\x0a\0\0\2", 1, b"\x0a\0\0\1", 80, 6],  # origin
        [float(M.T_EVICT), "n01", 0, 1, b"\x0a\0\0\2", 1, b"\x0a\0\0\1", 80, 6],
        [M.T_EVICTS, "n01", 0, 1, b"\x01" * 40],  # no valid record
        [M.T_EVICTS, "n01", 0, 0, M.flow_record(FlowTuple("10.0.0.2", 1, "10.0.0.1", 80, 6))],
        [M.T_ALIVE, "n09", "10.0.0.9", 7946, 0, 0, [[], 100, "yes", "", 1, {}]],
    ]
    data = seal("n01", bad, epoch=5)
    a.handle_datagram(net.now, data, net.addr(1))
    assert a.stats["drop.malformed"] == len(bad)
    assert net.view("n00") == before
    assert a.take_outgoing() == [] and a.take_events() == []


def test_unauthenticated_and_garbage_datagrams_are_dropped_by_reason():
    net = Network(seed=23)
    (a,) = net.cluster(1)
    other = Wire(label=LABEL, keyring=Keyring(bytes(range(1, 33))), sender="evil", epoch=0)
    a.handle_datagram(net.now, other.seal([other.encode(M.encode(M.Ping(1, "n00")))])[0], ("10.6.6.6", 1))
    a.handle_datagram(net.now, b"\x00" * 5, ("10.6.6.6", 1))
    s = a.stats
    assert s["drop.unknown_key"] == 1 and s["drop.truncated"] == 1
    assert a.take_outgoing() == []


def test_no_reply_to_unknown_address():
    net = Network(seed=24)
    (a,) = net.cluster(1)
    ping = seal("stranger", [M.encode(M.Ping(5, "n00"))])
    a.handle_datagram(net.now, ping, ("192.0.2.66", 9999))
    assert a.take_outgoing() == []
    assert a.stats["reply_refused"] == 1
    # ping-req naming an unknown target is not relayed either
    a.handle_datagram(net.now, seal("stranger", [M.encode(M.PingReq(6, "ghost", True))], epoch=8),
                      ("192.0.2.66", 9999))
    assert a.take_outgoing() == []


def test_configured_peer_address_gets_a_reply():
    net = Network(seed=25)
    a = net.add("a", 0, peers=[("192.0.2.7", 7946)], join=False)
    a.take_outgoing()
    a.handle_datagram(net.now, seal("p", [M.encode(M.Ping(5, "a"))]), ("192.0.2.7", 7946))
    out = a.take_outgoing()
    assert [o.dest for o in out] == [("192.0.2.7", 7946)]


def test_every_destination_is_a_member_or_peer_or_group():
    net = Network(seed=26, loss=0.05, group=True)
    net.cluster(8)
    allowed = {net.addr(i) for i in range(8)}
    seen = []
    orig = net.collect

    def spy(name):
        node = net.nodes[name]
        outs = node.take_outgoing()
        seen.extend(o.dest for o in outs)
        node._outgoing.extend(outs)  # put them back for the network
        orig(name)

    net.collect = spy
    net.run(20.0)
    net.crash("n03")
    net.run(20.0)
    assert seen and all(d is GROUP or d in allowed for d in seen)


# ---- awareness ------------------------------------------------------------------------------

def test_isolated_member_raises_its_awareness_and_slows_down():
    net = Network(seed=27)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    # n00 hears nothing at all: every probe and helper fails, so it blames itself
    net.cut |= {(o, "n00") for o in net.up}
    net.run(8.0)
    assert a.awareness.score >= 3
    probes_before = a.stats["probes"]
    net.run(10.0)
    # at score s the probe interval is (s+1) seconds
    assert a.stats["probes"] - probes_before <= 4


# ---- determinism and scale --------------------------------------------------------------------

def _run_scenario(seed: int) -> list:
    net = Network(seed=seed, loss=0.03)
    net.cluster(10)
    net.run(5.0)
    net.crash("n07")
    net.nodes["n02"].publish_eviction(flow(1), net.now)
    net.collect("n02")
    net.run(15.0)
    return [(n, type(e).__name__, getattr(getattr(e, "member", None), "name", None)) for n in sorted(net.events)
            for e in net.events[n]]


def test_same_seed_same_history():
    assert _run_scenario(31) == _run_scenario(31)


def test_stats_count_traffic_and_protocol_work():
    net = Network(seed=32)
    net.cluster(4)
    net.run(10.0)
    s = net.nodes["n01"].stats
    assert s["datagrams_sent"] > 0 and s["datagrams_received"] > 0 and s["bytes_sent"] > 0
    assert s["probes"] >= 8 and s["probe_acks"] >= 8
    assert s["members"] == 4 and s["members_live"] == 4


# ---- push-pull ------------------------------------------------------------------------------

def test_large_state_is_chunked_within_datagram_capacity_and_merges():
    net = Network(seed=33)
    (a,) = net.cluster(1)
    for i in range(80):
        meta = MemberMeta(vips=(f"10.255.{i}.1", f"10.255.{i}.2"), table_digest="x" * 16)
        rec = M.Alive(f"member-with-a-longish-name-{i:03d}", (f"10.1.{i}.1", 7946), 3, 1, meta)
        a.handle_datagram(net.now, seal(f"s{i}", [M.encode(rec)]), net.addr(0))
    a.take_events()
    chunks = a._state_chunks(nonce=9, reply=False, join=False)
    assert len(chunks) > 3
    assert all(len(c) <= a.wire.capacity for c in chunks)
    decoded = [M.decode(msgpack_roundtrip(c)) for c in chunks]
    assert [d.index for d in decoded] == list(range(len(chunks)))
    assert {d.count for d in decoded} == {len(chunks)}
    names = [r.name for d in decoded for r in d.records]
    assert sorted(names) == sorted(v.name for v in a.members())
    # and a fresh member learns all of it from the chunks
    b = net.add("b", 5, join=False)
    w = make_wire("n00")
    for d in w.seal(chunks):
        b.handle_datagram(net.now, d, net.addr(0))
    assert len(b.members()) == 82


def msgpack_roundtrip(data: bytes):
    import msgpack
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def test_push_pull_heals_a_member_that_missed_a_death():
    cfg = ProtocolConfig.lan(push_pull_interval=3.0, dead_reap_interval=120.0)
    net = Network(seed=34, config=cfg)
    net.cluster(6)
    run_until(net, lambda: converged(net), limit=5.0)
    # n05 is deaf to gossip while n02 dies and the news spreads
    net.cut |= {(o, "n05") for o in net.up}
    net.crash("n02")
    run_until(net, lambda: all(net.status(o, "n02") is Status.DEAD for o in net.up - {"n05"}), limit=30.0)
    net.run(5.0)
    net.cut.clear()
    # n05 itself may have suspected n02 meanwhile; push-pull or its own timer ends it
    run_until(net, lambda: net.status("n05", "n02") is Status.DEAD, limit=15.0)
    # whatever n05 concluded about the others while deaf, they refute it
    run_until(net, lambda: converged(net), limit=20.0)


def test_member_heard_from_but_unknown_is_learnt_by_a_state_pull():
    net = Network(seed=35)
    net.cluster(4)
    run_until(net, lambda: converged(net), limit=5.0)
    net.run(10.0)  # the join gossip has run its course
    a = net.nodes["n00"]
    assert all(len(net.nodes[o]._broadcasts) == 0 for o in net.up)
    a._next_push_pull = a._push_pull_from = net.now + 1000.0  # no regular anti-entropy in this test
    a.table.remove("n03")  # as if n03's alive never reached n00
    assert net.status("n00", "n03") is None
    run_until(net, lambda: net.status("n00", "n03") is Status.ALIVE, limit=20.0)
    assert a.stats["view_repair_pulls"] == 1


def test_relayed_probes_are_bounded():
    cfg = ProtocolConfig.lan(pending_probes_max=2)
    net = Network(seed=36, config=cfg)
    net.cluster(3)
    run_until(net, lambda: converged(net), limit=5.0)
    a = net.nodes["n00"]
    a.take_outgoing()
    reqs = [M.encode(M.PingReq(100 + i, "n02", True)) for i in range(5)]
    a.handle_datagram(net.now, seal("n01", reqs, epoch=60), net.addr(1))
    assert a.stats["pingreq_relayed"] == 2 and a.stats["pingreq_overflow"] == 3
    assert len([o for o in a.take_outgoing() if o.dest == net.addr(2)]) >= 1


def test_wire_rate_limit_drops_show_in_stats():
    from meshlb.cluster.ratelimit import RateLimiter

    w = Wire(label=LABEL, keyring=Keyring(KEY), sender="a", epoch=0, rate_limiter=RateLimiter(rate=1.0, burst=2))
    a = Node(name="a", address=("10.0.0.1", 7946), wire=w, config=ProtocolConfig.lan(), rng=random.Random(1),
             now=T0)
    for i in range(5):
        a.handle_datagram(T0, seal("b", [M.encode(M.Ack(i))], epoch=70 + i), ("10.0.0.2", 7946))
    assert a.stats["drop.rate_limited"] == 3


# ---- partitions -------------------------------------------------------------------------------

def _partition(net: Network, left: set[str]) -> None:
    right = net.up - left
    net.cut |= {(a, b) for a in left for b in right} | {(b, a) for a in left for b in right}


@pytest.mark.parametrize("reap", [120.0, 8.0], ids=["dead-remembered", "dead-reaped"])
def test_halves_find_each_other_after_a_partition(reap):
    cfg = ProtocolConfig.lan(dead_reap_interval=reap)
    net = Network(seed=37, config=cfg)
    net.cluster(10)
    run_until(net, lambda: converged(net), limit=5.0)
    left = {f"n0{i}" for i in range(5)}
    _partition(net, left)
    run_until(net, lambda: all(net.status(o, "n09") is not Status.ALIVE for o in left), limit=60.0)
    net.run(reap + 5.0)
    if reap < 60:
        assert net.status("n00", "n09") is None  # forgotten: only the peer list can help
    net.cut.clear()
    run_until(net, lambda: converged(net), limit=60.0)
    assert sum(net.nodes[o].stats["reconnects"] for o in net.up) > 0

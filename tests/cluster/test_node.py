"""Multi-member tests of the Node facade over a tiny deterministic in-memory network.

Every member is a real Node behind a real Wire; only the network and the clock are
simulated here. The network delivers after a fixed latency, drops with a seeded
probability, and can cut links; everything is driven by one event loop in time order,
so a test is reproducible.
"""
from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import replace

import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.keyring import Keyring
from meshlb.cluster.node import (
    GROUP, EvictionReceived, EvictionsReceived, FlowTuple, MemberDead, MemberLeft, MemberMeta, MemberSuspect, MemberUp,
    MetaChanged, Node, Status,
)
from meshlb.cluster.protocol_config import ProtocolConfig
from meshlb.cluster.wire import Wire

KEY = bytes(range(32))
LABEL = "test-cluster"
T0 = 1000.0


def make_wire(name: str, epoch: int = 0) -> Wire:
    return Wire(label=LABEL, keyring=Keyring(KEY), sender=name, epoch=epoch)


class Network:
    def __init__(self, seed: int = 1, loss: float = 0.0, latency: float = 0.001,
                 config: ProtocolConfig | None = None, group: bool = False) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.loss = loss
        self.latency = latency
        self.config = config or ProtocolConfig.lan()
        self.group = group
        self.now = T0
        self.nodes: dict[str, Node] = {}
        self.by_addr: dict[tuple[str, int], str] = {}
        self.up: set[str] = set()
        self.events: dict[str, list] = {}
        self.cut: set[tuple[str, str]] = set()  # (src, dst) links that drop everything
        self._q: list = []
        self._n = 0
        self.delivered = 0

    @staticmethod
    def addr(i: int) -> tuple[str, int]:
        return (f"10.0.0.{i + 1}", 7946)

    def add(self, name: str, index: int, peers=(), incarnation: int = 0, meta: MemberMeta | None = None,
            join: bool = True, config: ProtocolConfig | None = None) -> Node:
        a = self.addr(index)
        node = Node(name=name, address=a, wire=make_wire(name, incarnation), config=config or self.config,
                    rng=random.Random(f"{self.seed}:{name}:{incarnation}"), now=self.now, meta=meta,
                    incarnation=incarnation, peers=peers, group=self.group)
        self.nodes[name] = node
        self.by_addr[a] = name
        self.up.add(name)
        self.events.setdefault(name, [])
        if join:
            node.join(self.now)
        self._collect(name)
        return node

    def cluster(self, n: int, **kw) -> list[Node]:
        out = []
        for i in range(n):
            peers = () if self.group else ([self.addr(0)] if i else [])
            out.append(self.add(f"n{i:02d}", i, peers=peers, **kw))
        return out

    def crash(self, name: str) -> None:
        self.up.discard(name)

    def _collect(self, name: str) -> None:
        node = self.nodes[name]
        self.events[name].extend(node.take_events())
        for o in node.take_outgoing():
            if o.dest is GROUP:
                dests = [n for n in sorted(self.up) if n != name] if self.group else []
            else:
                d = self.by_addr.get(o.dest)
                dests = [d] if d is not None else []
            for d in dests:
                if (name, d) in self.cut or self.rng.random() < self.loss:
                    continue
                self._n += 1
                heapq.heappush(self._q, (self.now + self.latency, self._n, d, o.data, node.address))

    def inject(self, dest: str, data: bytes, source: tuple[str, int]) -> None:
        self._n += 1
        heapq.heappush(self._q, (self.now, self._n, dest, data, source))

    def run(self, duration: float) -> None:
        until = self.now + duration
        while True:
            nxt = self._q[0][0] if self._q else float("inf")
            for name in self.up:
                nxt = min(nxt, self.nodes[name].next_deadline())
            if nxt > until:
                self.now = until
                return
            self.now = max(self.now, nxt)
            while self._q and self._q[0][0] <= self.now:
                _, _, d, data, src = heapq.heappop(self._q)
                if d in self.up:
                    self.delivered += 1
                    self.nodes[d].handle_datagram(self.now, data, src)
                    self._collect(d)
            for name in sorted(self.up):
                node = self.nodes[name]
                if node.next_deadline() <= self.now:
                    node.tick(self.now)
                    self._collect(name)

    def status(self, observer: str, subject: str) -> Status | None:
        for v in self.nodes[observer].members():
            if v.name == subject:
                return v.status
        return None

    def view(self, observer: str) -> dict[str, tuple[Status, int]]:
        return {v.name: (v.status, v.incarnation) for v in self.nodes[observer].members()}

    def all_see(self, subject: str, status: Status) -> bool:
        return all(self.status(o, subject) is status for o in self.up if o != subject)

    def kinds(self, observer: str, cls, subject: str | None = None) -> list:
        return [e for e in self.events[observer] if isinstance(e, cls)
                and (subject is None or getattr(e, "member", None) is None or e.member.name == subject)]


def converged(net: Network) -> bool:
    names = set(net.up)
    for o in net.up:
        alive = {v.name for v in net.nodes[o].members() if v.status is Status.ALIVE}
        if alive != names:
            return False
    return True


def run_until(net: Network, predicate, limit: float, step: float = 0.1) -> float:
    start = net.now
    while not predicate():
        if net.now - start > limit:
            raise AssertionError(f"condition not reached within {limit}s")
        net.run(step)
    return net.now - start


def seal(sender: str, messages: list, epoch: int = 7) -> bytes:
    w = make_wire(sender, epoch)
    return w.seal([w.encode(m) for m in messages])[0]


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
    net._collect("n04")
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
    net._collect("n01")
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
        net._collect(o)
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


# ---- evictions ------------------------------------------------------------------------------

def flow(i: int) -> FlowTuple:
    return FlowTuple(f"198.18.{i // 250}.{i % 250 + 1}", 10000 + i, "10.255.0.1", 80, 6)


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
        net._collect(origin)
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
    net._collect("n00")
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
        net._collect("n01")
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
        net._collect(origin)
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
    net._collect("n03")
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
        net._collect(origin)
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
    net._collect("n00")
    run_until(net, lambda: len(received(net, "n01")) == 2, limit=5.0)


def test_publish_eviction_validates_the_tuple():
    net = Network()
    (a,) = net.cluster(1)
    with pytest.raises(ValueError):
        a.publish_eviction(FlowTuple("1.2.3.4", 1, "10.0.0.1", 80, 1), net.now)
    with pytest.raises(ValueError):
        a.publish_eviction(FlowTuple("not-an-ip", 1, "10.0.0.1", 80, 6), net.now)


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
    orig = net._collect

    def spy(name):
        node = net.nodes[name]
        outs = node.take_outgoing()
        seen.extend(o.dest for o in outs)
        node._outgoing.extend(outs)  # put them back for the network
        orig(name)

    net._collect = spy
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
    net._collect("n02")
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
    net._collect("n00")
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
    net._collect("n00")
    net.run(1.0)
    assert a.stats.get("eviction_runs_sent", 0) == 0
    for o in ("n01", "n02"):  # the older one understands these
        assert received(net, o) == Counter(("n00", i + 1, flow(i)) for i in range(10))
    net.crash("n02")
    run_until(net, lambda: net.status("n00", "n02") is Status.DEAD, limit=30.0)
    a.publish_eviction_records([M.flow_record(flow(i)) for i in range(10, 20)], net.now)
    net._collect("n00")
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
        net._collect(origin)
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
    net._collect("n00")
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
    net._collect("n00")
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

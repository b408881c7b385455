"""How the agent holds each batch of socket closes until its evictions have gone out
(the part of the agent between the tracer and the gossip driver, with both faked)."""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from meshlb.agent import root as agent_mod
from meshlb.agent import Agent
from meshlb.cluster.node import MemberLeft, MemberUp
from meshlb.config import default_config, parse
from meshlb.dataplane import layouts as L


class FakeDriver:
    def __init__(self) -> None:
        self.seq = 0
        self.sent_through = 0
        self.joined = True
        self.running = True
        self.on_sent = None
        self._members = []

        self.flushes = 0

    def publish_eviction(self, flow) -> int:
        self.seq += 1
        return self.seq

    def publish_evictions(self, flows) -> int:
        self.flushes += 1
        for f in flows:
            self.publish_eviction(f)
        return self.seq if flows else 0

    def publish_eviction_records(self, records) -> int:
        return self.publish_evictions(records)

    def evictions_sent_through(self) -> int:
        return self.sent_through

    def members(self):
        return self._members

    def send_all(self) -> None:
        self.sent_through = self.seq
        if self.on_sent is not None:
            self.on_sent()


class FakeTracer:
    def __init__(self) -> None:
        self.commits = 0

    def commit(self) -> None:
        self.commits += 1


class FakeBalancer:
    """evict_many finds the given forward entry for every key (None: the flow is not
    held here)."""

    def __init__(self, ct) -> None:
        self.ct = ct
        self.evicted: list[bytes] = []
        self.calls = 0

    def evict_many(self, keys):
        self.calls += 1
        self.evicted += keys
        if self.ct is None:
            return [(L.MLB_EVICT_NONE, bytes(32))] * len(keys)
        return [(L.MLB_EVICT_FORWARD, bytes(self.ct))] * len(keys)


def close_of(flow, refused=False):
    """A tracer event of ``flow`` (to a VIP of the default config's)."""
    key = L.flow_key_bytes(flow.src, flow.sport, flow.dst, flow.dport, flow.proto)
    return SimpleNamespace(flow=flow, refused=refused, raw_key=key)


def make_agent() -> Agent:
    a = Agent.__new__(Agent)
    a.cfg = default_config()
    a.vips = a.cfg.vips
    a.evictions = Counter()
    a.driver = FakeDriver()
    a.tracer = FakeTracer()
    a._published_seq = 0
    a._held_through = None
    a._hold_timer = None
    a._to_publish = []
    a.tables = SimpleNamespace(local_ids={7}, schedule=lambda: None)
    a._closing = []
    a._received = []
    a._vip_ends, a._vip_ends_of, a._member_addrs = frozenset(), None, None
    a.health = None
    a.name = "mix1"
    a._rebuild_handle = None
    a.driver.on_sent = a._release_closes
    return a


def publish(a: Agent, n: int) -> None:
    for _ in range(n):
        a._published_seq = a.driver.publish_eviction(None)


def test_a_batch_is_committed_only_after_its_evictions_went_out():
    async def main():
        a = make_agent()
        publish(a, 3)
        a._hold_closes()
        assert a.tracer.commits == 0  # read, published, not yet in a datagram
        a.driver.sent_through = 2
        a._release_closes()
        assert a.tracer.commits == 0
        a.driver.send_all()
        assert a.tracer.commits == 1 and a._hold_timer is None
        # a batch that published nothing (all unbalanced) goes at once
        a._hold_closes()
        assert a.tracer.commits == 2
        a.driver.send_all()  # a later send does not commit twice
        assert a.tracer.commits == 2
        assert a.evictions["closes_released_unsent"] == 0

    asyncio.run(main())


def test_a_batch_whose_evictions_cannot_go_out_is_released_after_the_limit(monkeypatch):
    monkeypatch.setattr(agent_mod, "CLOSES_HOLD_MAX_S", 0.05)

    async def main():
        a = make_agent()
        publish(a, 1)
        a._hold_closes()
        await asyncio.sleep(0.2)
        assert a.tracer.commits == 1
        assert a.evictions["closes_released_unsent"] == 1

    asyncio.run(main())


def test_before_the_join_every_backend_side_close_counts_as_balanced():
    async def main():
        a = make_agent()
        close = SimpleNamespace(src="10.9.9.9", sport=40000, dst="10.0.0.5", dport=8080)
        a.driver.joined = False
        assert a._is_balanced_flow(close)  # the members are not known yet
        a.driver.joined = True
        assert not a._is_balanced_flow(close)  # known, and 10.9.9.9 is none of them
        member = SimpleNamespace(name="mix9", incarnation=1, address=("10.9.9.9", 7946),
                                 meta=SimpleNamespace(addresses=()))
        a.driver._members = [member]
        assert not a._is_balanced_flow(close)  # the agent has not heard of it yet
        a._on_cluster_event(MemberUp(member))
        assert a._is_balanced_flow(close)
        a.driver._members = []
        a._on_cluster_event(MemberLeft(member))
        assert not a._is_balanced_flow(close)

    asyncio.run(main())


def test_closes_of_a_batch_are_published_together_when_it_ends():
    async def main():
        a = make_agent()
        a._is_balanced_flow = lambda f: True
        a.balancer = FakeBalancer(None)
        for port in (40001, 40002, 40003):
            flow = SimpleNamespace(src="198.18.1.2", sport=port, dst="198.19.0.1", dport=80, proto=6)
            a._on_sock_event(close_of(flow))
        assert a.driver.seq == 0  # nothing published while the batch is being read
        assert a.balancer.evicted == []  # nor evicted
        a._hold_closes()
        assert a.balancer.calls == 1 and len(a.balancer.evicted) == 3
        assert a.driver.flushes == 1 and a.driver.seq == 3 and a.evictions["sent"] == 3
        assert a._held_through == 3 and a.tracer.commits == 0
        a.driver.send_all()
        assert a.tracer.commits == 1
        # after a leave, closes are counted, not published
        a.driver.running = False
        a._on_sock_event(close_of(flow))
        a._hold_closes()
        assert a.evictions["unpublished_left_cluster"] == 1 and a.driver.seq == 3

    asyncio.run(main())


def _vip_flow(a: Agent, port: int = 40001):
    vip = a.vips[0]
    return SimpleNamespace(src="198.18.1.2" if vip.address.version == 4 else "fd00::2", sport=port,
                           dst=str(vip.address), dport=vip.port, proto=6)


def test_a_close_no_other_mix_can_hold_is_not_gossiped():
    """Set up here by its SYN, for this node's own backend, never seen from a peer:
    forgotten locally, not published. Any of those three missing: published."""
    a = make_agent()
    a.cfg = parse('[node]\nname = "mix1"\niface = "eth0"\n[cluster]\nkey_file = "/k"\n'
                  '[[vips]]\naddress = "198.19.0.1"\nport = 80\n')
    a.vips = a.cfg.vips
    a._is_balanced_flow = lambda f: True
    ct = lambda **kw: L.CtValue(**{"syn_seq": 1000, "backend_id": 7, "flags": L.MLB_CT_F_ESTABLISHED, **kw})  # noqa: E731
    cases = [
        (ct(), False),
        (ct(flags=L.MLB_CT_F_ESTABLISHED | L.MLB_CT_F_PEER_SEEN), True),  # a peer sent some of it
        (ct(syn_seq=0), True),      # picked up mid-flow: it began elsewhere
        (ct(backend_id=3), True),   # forwarded to another backend (closes here all the same)
        (None, True),               # not held here at all
    ]
    for i, (entry, published) in enumerate(cases):
        a.balancer = FakeBalancer(entry)
        before = len(a._to_publish)
        a._on_sock_event(close_of(_vip_flow(a, 40000 + i)))
        a._evict_closes()
        assert (len(a._to_publish) > before) == published, (i, entry)
        assert len(a.balancer.evicted) == 1  # forgotten here in every case
    assert a.evictions["local_only"] == 1
    # a reset (no socket took the segment) is always published
    a.balancer = FakeBalancer(ct())
    a._on_sock_event(close_of(_vip_flow(a, 40100), refused=True))
    a._evict_closes()
    assert a.evictions["local_only"] == 1 and len(a._to_publish) == 5


def test_peers_evictions_of_one_loop_turn_are_applied_in_one_call():
    from meshlb.cluster.node import EvictionReceived, FlowTuple

    def received(client, port):
        return EvictionReceived(FlowTuple(client, port, "198.19.0.1", 80, 6), "mix2", port)

    async def main():
        a = make_agent()
        a.balancer = FakeBalancer(L.CtValue(backend_id=3))
        for port in (40001, 40002, 40003):
            a._on_cluster_event(received("198.18.1.2", port))
        a._on_cluster_event(received("not an address", 1))
        assert a.balancer.calls == 0 and a.evictions["received"] == 4
        await asyncio.sleep(0)
        assert a.balancer.calls == 1 and len(a.balancer.evicted) == 3
        assert a.evictions["applied"] == 3 and a.evictions["malformed"] == 1
        a._on_cluster_event(received("198.18.1.2", 40004))
        await asyncio.sleep(0)
        assert a.balancer.calls == 2 and a.evictions["applied"] == 4

    asyncio.run(main())


def test_a_run_of_peers_evictions_is_applied_with_the_singles_of_the_same_turn():
    from meshlb.cluster.messages import flow_record
    from meshlb.cluster.node import EvictionReceived, EvictionsReceived, FlowTuple

    flows = [FlowTuple("198.18.1.2", p, "198.19.0.1", 80, 6) for p in (40001, 40002, 40003)]

    async def main():
        a = make_agent()
        a.balancer = FakeBalancer(L.CtValue(backend_id=3))
        a._on_cluster_event(EvictionsReceived("mix2", (1, 2), tuple(flow_record(f) for f in flows[:2])))
        a._on_cluster_event(EvictionReceived(flows[2], "mix3", 1))
        assert a.balancer.calls == 0 and a.evictions["received"] == 3
        await asyncio.sleep(0)
        assert a.balancer.calls == 1
        # the records go to the data plane as they came: they are its keys
        assert a.balancer.evicted == [L.flow_key_bytes(*f) for f in flows]
        assert a.evictions["applied"] == 3

    asyncio.run(main())

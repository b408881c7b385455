"""The eviction pump (meshlb/agent/evictions.py): how each batch of socket closes is
evicted, published and held until its evictions have gone out, and how peers' evictions
are applied; with the tracer, the balancer and the gossip driver faked."""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from meshlb.agent import evictions
from meshlb.agent.evictions import EvictionPump
from meshlb.cluster.membership import MemberView
from meshlb.cluster.messages import flow_record
from meshlb.cluster.node import EvictionReceived, EvictionsReceived, FlowTuple, MemberLeft, MemberMeta, MemberUp, Status
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

    def publish_eviction_records(self, records) -> int:
        self.flushes += 1
        for r in records:
            self.publish_eviction(r)
        return self.seq if records else 0

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
        self.started = None

    def start(self, **kwargs) -> None:
        self.started = kwargs

    def commit(self) -> None:
        self.commits += 1


class FakeBalancer:
    """evict_many finds the given forward entry for every key (None: the flow is not
    held here)."""

    def __init__(self, ct=None) -> None:
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


def make_pump(balancer=None, vips=None) -> EvictionPump:
    """A started pump, wired to the driver as the agent wires it; 7 is this node's
    own backend."""
    pump = EvictionPump(balancer or FakeBalancer(), FakeTracer(), FakeDriver(), marks=None, counts=Counter(),
                        local_ids={7}, vips=default_config().vips if vips is None else vips)
    pump.start()
    return pump


def publish(pump: EvictionPump, n: int) -> None:
    """n evictions published by the previous batches."""
    flows = [bytes(L.flow_key("198.18.1.2", 40000 + i, "198.19.0.1", 80, 6)) for i in range(n)]
    pump._to_publish += flows
    pump.publish()


def test_start_wires_the_tracer_and_the_driver():
    pump = make_pump()
    assert pump.driver.on_sent == pump.release_closes
    assert pump.tracer.started["callback"] == pump.on_close and pump.tracer.started["on_batch"] == pump.end_batch
    assert pump.tracer.started["max_batch"] == evictions.TRACER_MAX_BATCH


def test_a_batch_is_committed_only_after_its_evictions_went_out():
    async def main():
        pump = make_pump()
        publish(pump, 3)
        pump.end_batch()
        assert pump.tracer.commits == 0  # read, published, not yet in a datagram
        pump.driver.sent_through = 2
        pump.release_closes()
        assert pump.tracer.commits == 0
        pump.driver.send_all()
        assert pump.tracer.commits == 1 and pump._hold_timer is None
        # a batch that published nothing (all unbalanced) goes at once
        pump.end_batch()
        assert pump.tracer.commits == 2
        pump.driver.send_all()  # a later send does not commit twice
        assert pump.tracer.commits == 2
        assert pump.counts["closes_released_unsent"] == 0

    asyncio.run(main())


def test_a_batch_whose_evictions_cannot_go_out_is_released_after_the_limit(monkeypatch):
    monkeypatch.setattr(evictions, "CLOSES_HOLD_MAX_S", 0.05)

    async def main():
        pump = make_pump()
        publish(pump, 1)
        pump.end_batch()
        await asyncio.sleep(0.2)
        assert pump.tracer.commits == 1
        assert pump.counts["closes_released_unsent"] == 1

    asyncio.run(main())


def test_before_the_join_every_backend_side_close_counts_as_balanced():
    pump = make_pump()
    handlers = pump.cluster_handlers()
    close = SimpleNamespace(src="10.9.9.9", sport=40000, dst="10.0.0.5", dport=8080)
    pump.driver.joined = False
    assert pump.is_balanced_flow(close)  # the members are not known yet
    pump.driver.joined = True
    assert not pump.is_balanced_flow(close)  # known, and 10.9.9.9 is none of them
    member = MemberView("mix9", ("10.9.9.9", 7946), Status.ALIVE, 1, MemberMeta(), 0.0)
    pump.driver._members = [member]
    assert not pump.is_balanced_flow(close)  # the pump has not heard of it yet
    handlers[MemberUp](MemberUp(member))
    assert pump.is_balanced_flow(close)
    pump.driver._members = []
    handlers[MemberLeft](MemberLeft(member))
    assert not pump.is_balanced_flow(close)


def test_a_close_of_a_vip_is_balanced_and_the_vips_follow_a_reload():
    pump = make_pump(vips=parse('[node]\nname = "mix1"\niface = "eth0"\n[cluster]\nkey_file = "/k"\n'
                                '[[vips]]\naddress = "198.19.0.1"\nport = 80\n').vips)
    to_vip = SimpleNamespace(src="10.9.9.9", sport=40000, dst="198.19.0.1", dport=80)
    assert pump.is_balanced_flow(to_vip)
    pump.set_vips([])
    assert not pump.is_balanced_flow(to_vip)


def test_closes_of_a_batch_are_published_together_when_it_ends():
    async def main():
        pump = make_pump(FakeBalancer(None))
        pump.is_balanced_flow = lambda f: True
        for port in (40001, 40002, 40003):
            flow = SimpleNamespace(src="198.18.1.2", sport=port, dst="198.19.0.1", dport=80, proto=6)
            pump.on_close(close_of(flow))
        assert pump.driver.seq == 0  # nothing published while the batch is being read
        assert pump.balancer.evicted == []  # nor evicted
        pump.end_batch()
        assert pump.balancer.calls == 1 and len(pump.balancer.evicted) == 3
        assert pump.driver.flushes == 1 and pump.driver.seq == 3 and pump.counts["sent"] == 3
        assert pump._held_through == 3 and pump.tracer.commits == 0
        pump.driver.send_all()
        assert pump.tracer.commits == 1
        # after a leave, closes are counted, not published
        pump.driver.running = False
        pump.on_close(close_of(flow))
        pump.end_batch()
        assert pump.counts["unpublished_left_cluster"] == 1 and pump.driver.seq == 3

    asyncio.run(main())


def test_a_close_no_other_mix_can_hold_is_not_gossiped():
    """Set up here by its SYN, for this node's own backend, never seen from a peer:
    forgotten locally, not published. Any of those three missing: published."""
    pump = make_pump()
    pump.is_balanced_flow = lambda f: True
    ct = lambda **kw: L.CtValue(**{"syn_seq": 1000, "backend_id": 7, "flags": L.MLB_CT_F_ESTABLISHED, **kw})  # noqa: E731
    flow = lambda port: SimpleNamespace(src="198.18.1.2", sport=port, dst="198.19.0.1", dport=80, proto=6)  # noqa: E731
    cases = [
        (ct(), False),
        (ct(flags=L.MLB_CT_F_ESTABLISHED | L.MLB_CT_F_PEER_SEEN), True),  # a peer sent some of it
        (ct(syn_seq=0), True),      # picked up mid-flow: it began elsewhere
        (ct(backend_id=3), True),   # forwarded to another backend (closes here all the same)
        (None, True),               # not held here at all
    ]
    for i, (entry, published) in enumerate(cases):
        pump.balancer = FakeBalancer(entry)
        before = len(pump._to_publish)
        pump.on_close(close_of(flow(40000 + i)))
        pump.evict_closes()
        assert (len(pump._to_publish) > before) == published, (i, entry)
        assert len(pump.balancer.evicted) == 1  # forgotten here in every case
    assert pump.counts["local_only"] == 1
    # a reset (no socket took the segment) is always published
    pump.balancer = FakeBalancer(ct())
    pump.on_close(close_of(flow(40100), refused=True))
    pump.evict_closes()
    assert pump.counts["local_only"] == 1 and len(pump._to_publish) == 5


def test_peers_evictions_of_one_loop_turn_are_applied_in_one_call():
    def received(client, port):
        return EvictionReceived(FlowTuple(client, port, "198.19.0.1", 80, 6), "mix2", port)

    async def main():
        pump = make_pump(FakeBalancer(L.CtValue(backend_id=3)))
        handle = pump.cluster_handlers()[EvictionReceived]
        for port in (40001, 40002, 40003):
            handle(received("198.18.1.2", port))
        handle(received("not an address", 1))
        assert pump.balancer.calls == 0 and pump.counts["received"] == 4
        await asyncio.sleep(0)
        assert pump.balancer.calls == 1 and len(pump.balancer.evicted) == 3
        assert pump.counts["applied"] == 3 and pump.counts["malformed"] == 1
        handle(received("198.18.1.2", 40004))
        await asyncio.sleep(0)
        assert pump.balancer.calls == 2 and pump.counts["applied"] == 4

    asyncio.run(main())


def test_a_run_of_peers_evictions_is_applied_with_the_singles_of_the_same_turn():
    flows = [FlowTuple("198.18.1.2", p, "198.19.0.1", 80, 6) for p in (40001, 40002, 40003)]

    async def main():
        pump = make_pump(FakeBalancer(L.CtValue(backend_id=3)))
        handlers = pump.cluster_handlers()
        handlers[EvictionsReceived](EvictionsReceived("mix2", (1, 2), tuple(flow_record(f) for f in flows[:2])))
        handlers[EvictionReceived](EvictionReceived(flows[2], "mix3", 1))
        assert pump.balancer.calls == 0 and pump.counts["received"] == 3
        await asyncio.sleep(0)
        assert pump.balancer.calls == 1
        # the records go to the data plane as they came: they are its keys
        assert pump.balancer.evicted == [L.flow_key_bytes(*f) for f in flows]
        assert pump.counts["applied"] == 3

    asyncio.run(main())


def test_stopping_applies_what_was_received_and_leaves_the_held_batch_in_the_ring():
    async def main():
        pump = make_pump(FakeBalancer(L.CtValue(backend_id=3)))
        pump.tracer.stop = lambda: setattr(pump.tracer, "stopped", True)
        publish(pump, 1)
        pump.end_batch()
        pump.receive(FlowTuple("198.18.1.2", 40001, "198.19.0.1", 80, 6))
        pump.stop()
        assert pump.tracer.stopped and pump.balancer.calls == 1 and pump.counts["applied"] == 1
        await asyncio.sleep(0.01)
        assert pump.tracer.commits == 0 and pump._hold_timer is None

    asyncio.run(main())


def test_marks_are_saved_as_the_driver_reports_them_and_a_failure_is_counted():
    saved = []

    class Marks:
        def save(self, marks):
            saved.extend(marks)

    pump = make_pump()
    pump.marks = Marks()
    pump.driver.eviction_marks = lambda: [SimpleNamespace(origin="mix2", epoch=5, contiguous=17)]
    pump.save_marks()
    assert saved == [("mix2", 5, 17)]
    pump.marks.save = lambda marks: (_ for _ in ()).throw(OSError("map full"))
    pump.save_marks()
    assert pump.counts["marks_save_failed"] == 1

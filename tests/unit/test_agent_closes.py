"""How the agent holds each batch of socket closes until its evictions have gone out
(the part of the agent between the tracer and the gossip driver, with both faked)."""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from meshlb import agent as agent_mod
from meshlb.agent import Agent, vip_specs
from meshlb.config import default_config


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


def make_agent() -> Agent:
    a = Agent.__new__(Agent)
    a.cfg = default_config()
    a.vips = vip_specs(a.cfg)
    a.evictions = Counter()
    a.driver = FakeDriver()
    a.tracer = FakeTracer()
    a._published_seq = 0
    a._held_through = None
    a._hold_timer = None
    a._to_publish = []
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
    a = make_agent()
    close = SimpleNamespace(src="10.9.9.9", sport=40000, dst="10.0.0.5", dport=8080)
    a.driver.joined = False
    assert a._is_balanced_flow(close)  # the members are not known yet
    a.driver.joined = True
    assert not a._is_balanced_flow(close)  # known, and 10.9.9.9 is none of them
    a.driver._members = [SimpleNamespace(address=("10.9.9.9", 7946), meta=SimpleNamespace(addresses=()))]
    assert a._is_balanced_flow(close)


def test_closes_of_a_batch_are_published_together_when_it_ends():
    async def main():
        a = make_agent()
        a._is_balanced_flow = lambda f: True
        a._evict_key = lambda key: False
        for port in (40001, 40002, 40003):
            flow = SimpleNamespace(src="198.18.1.2", sport=port, dst="198.19.0.1", dport=80, proto=6)
            a._on_sock_event(SimpleNamespace(flow=flow, refused=False, raw_key=b""))
        assert a.driver.seq == 0  # nothing published while the batch is being read
        a._hold_closes()
        assert a.driver.flushes == 1 and a.driver.seq == 3 and a.evictions["sent"] == 3
        assert a._held_through == 3 and a.tracer.commits == 0
        a.driver.send_all()
        assert a.tracer.commits == 1
        # after a leave, closes are counted, not published
        a.driver.running = False
        a._on_sock_event(SimpleNamespace(flow=flow, refused=False, raw_key=b""))
        a._hold_closes()
        assert a.evictions["unpublished_left_cluster"] == 1 and a.driver.seq == 3

    asyncio.run(main())

"""A tiny deterministic in-memory network for multi-member tests of the cluster protocol.

Every member is a real Node (or SwimNode) behind a real Wire; only the network and the
clock are simulated. The network delivers after a fixed latency, drops with a seeded
probability, and can cut links; everything is driven by one event loop in time order,
so a test is reproducible.
"""
from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from meshlb.cluster.keyring import Keyring
from meshlb.cluster.node import GROUP, FlowTuple, MemberMeta, Node, Status
from meshlb.cluster.protocol_config import ProtocolConfig
from meshlb.cluster.wire import Wire

KEY = bytes(range(32))
LABEL = "test-cluster"
T0 = 1000.0


def make_wire(name: str, epoch: int = 0) -> Wire:
    return Wire(label=LABEL, keyring=Keyring(KEY), sender=name, epoch=epoch)


class Network:
    """Members on one virtual clock: datagrams arrive after ``latency``, are lost with
    probability ``loss`` and on ``cut`` links; ``node_class`` builds each member (a
    Node, or a SwimNode for membership alone)."""

    def __init__(self, seed: int = 1, loss: float = 0.0, latency: float = 0.001,
                 config: ProtocolConfig | None = None, group: bool = False,
                 node_class: Callable[..., Any] = Node) -> None:
        self.node_class = node_class
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
        node = self.node_class(name=name, address=a, wire=make_wire(name, incarnation), config=config or self.config,
                    rng=random.Random(f"{self.seed}:{name}:{incarnation}"), now=self.now, meta=meta,
                    incarnation=incarnation, peers=peers, group=self.group)
        self.nodes[name] = node
        self.by_addr[a] = name
        self.up.add(name)
        self.events.setdefault(name, [])
        if join:
            node.join(self.now)
        self.collect(name)
        return node

    def cluster(self, n: int, **kw) -> list[Node]:
        out = []
        for i in range(n):
            peers = () if self.group else ([self.addr(0)] if i else [])
            out.append(self.add(f"n{i:02d}", i, peers=peers, **kw))
        return out

    def crash(self, name: str) -> None:
        self.up.discard(name)

    def collect(self, name: str) -> None:
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
                    self.collect(d)
            for name in sorted(self.up):
                node = self.nodes[name]
                if node.next_deadline() <= self.now:
                    node.tick(self.now)
                    self.collect(name)

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


def flow(i: int) -> FlowTuple:
    return FlowTuple(f"198.18.{i // 250}.{i % 250 + 1}", 10000 + i, "10.255.0.1", 80, 6)

"""The membership engine on its own, and the delegate interface a payload plugs into."""
from __future__ import annotations

import subprocess
import sys

import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.delegate import NoDelegate
from meshlb.cluster.swim import MemberDead, MemberSuspect, MemberUp, SwimNode
from tests.cluster.memnet import Network, converged, run_until


class Notes(NoDelegate):
    """A payload that adds a note to every push-pull, broadcasts notes on demand and
    records what reaches it. Its notes travel as digests (a message type the engine
    does not handle itself); the entry's origin is the text."""

    def __init__(self) -> None:
        self.host = None
        self.got: list[tuple[str, str, bool]] = []  # (sender, text, reply)
        self.states: list[tuple[bool, bool]] = []  # (join, reply) of each local_state
        self.back: list[tuple[str, int]] = []
        self.joins = 0

    def attach(self, host, now):
        self.host = host

    def handlers(self):
        return {M.EvictionDigest: self._on_note}

    def local_state(self, now, *, join, reply):
        self.states.append((join, reply))
        return [self._note(f"state-of-{self.host.name}", reply)]

    def joining(self, now):
        self.joins += 1

    def member_back(self, address, now):
        self.back.append(address)

    def note(self, text: str, now: float) -> None:
        self.host.broadcast(("note", text), self._note(text, False), 2)
        self.host.expedite(now, 0.01)

    def _note(self, text: str, reply: bool) -> bytes:
        return self.host.encode(M.EvictionDigest(reply, (M.DigestEntry(text, 0, 0, ()),)))

    def _on_note(self, now, msg, sender, source):
        self.got.append((sender, msg.entries[0].origin, msg.reply))


def notes_network(seed: int) -> tuple[Network, dict[str, Notes]]:
    notes: dict[str, Notes] = {}

    def member(**kw):
        notes[kw["name"]] = Notes()
        return SwimNode(delegate=notes[kw["name"]], **kw)

    return Network(seed=seed, node_class=member), notes


def test_membership_runs_without_a_payload():
    net = Network(seed=50, node_class=SwimNode)
    net.cluster(5)
    run_until(net, lambda: converged(net), limit=5.0)
    net.crash("n04")
    run_until(net, lambda: all(net.status(o, "n04") is M.Status.DEAD for o in net.up), limit=30.0)
    for o in net.up:
        assert {type(e) for e in net.events[o]} <= {MemberUp, MemberSuspect, MemberDead}
        assert not any("evict" in k for k in net.nodes[o].stats)


def test_a_payload_rides_on_joins_push_pulls_and_gossip():
    net, notes = notes_network(51)
    net.cluster(4)
    run_until(net, lambda: converged(net), limit=5.0)
    # n00 is the seed (no peers: a cluster of one at once); the others join through it
    assert notes["n00"].joins == 0 and all(notes[n].joins == 1 for n in ("n01", "n02", "n03"))
    assert (True, False) in notes["n01"].states  # its join
    assert (False, True) in notes["n00"].states  # the seed's reply
    assert ("n01", "state-of-n01", False) in notes["n00"].got
    assert ("n00", "state-of-n00", True) in notes["n01"].got
    notes["n02"].note("hello", net.now)
    net.collect("n02")
    run_until(net, lambda: all(("n02", "hello", False) in notes[o].got for o in ("n00", "n01", "n03")), limit=2.0)


def test_a_payload_hears_of_a_member_that_comes_back():
    net, notes = notes_network(52)
    net.cluster(4)
    run_until(net, lambda: converged(net), limit=5.0)
    net.cut |= {(o, "n03") for o in net.up} | {("n03", o) for o in net.up}
    run_until(net, lambda: all(net.status(o, "n03") is M.Status.DEAD for o in ("n00", "n01", "n02")), limit=30.0)
    assert not any(notes[o].back for o in ("n00", "n01", "n02"))
    net.cut.clear()
    run_until(net, lambda: converged(net), limit=30.0)
    assert all(net.addr(3) in notes[o].back for o in ("n00", "n01", "n02"))


def test_a_payload_cannot_take_over_membership_messages():
    class Greedy(NoDelegate):
        def handlers(self):
            return {M.Ping: lambda now, msg, sender, source: None}

    with pytest.raises(ValueError, match="membership protocol's messages"):
        Network(seed=53, node_class=lambda **kw: SwimNode(delegate=Greedy(), **kw)).cluster(1)


def test_the_engine_imports_nothing_of_evictions():
    code = "import sys, meshlb.cluster.swim; print(sorted(m for m in sys.modules if 'evict' in m))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"

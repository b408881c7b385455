"""The cluster simulator: its network model and bookkeeping, then whole-cluster runs of
the real protocol (Node + Wire with real encryption) that CI relies on.

Whole-cluster runs are shared between tests through module-scoped fixtures: one
N=100 run answers "converges", "detects the crash", "no false deaths" and "evictions
arrive by gossip", which keeps the file within its CI budget.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest

from meshlb.cluster.sim import TIMING_KEYS, NodeSpec, Sim, SimConfig, _Sched, percentile
from meshlb.cluster.simnet import NetConfig, SimNetwork, parse_fraction, parse_partition

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------
# network model


def test_loss_rate_matches_configuration():
    net = SimNetwork(NetConfig(loss=0.05, jitter_s=0.0), random.Random(7))
    arrived = sum(len(net.route(0.0, 0, 1)) for _ in range(40_000))
    # 40k Bernoulli(0.95) trials: sd ~ 44, so +-300 is a > 6 sigma band
    assert abs(arrived - 38_000) < 300
    assert net.counters["loss"] == 40_000 - arrived


def test_latency_is_base_plus_nonnegative_jitter_and_reorders():
    net = SimNetwork(NetConfig(latency_s=0.001, jitter_s=0.0005), random.Random(3))
    arrivals = [net.route(i * 0.0001, 0, 1)[0] for i in range(2000)]
    assert all(a >= i * 0.0001 + 0.001 for i, a in enumerate(arrivals))
    # datagrams sent 100 us apart with 500 us mean jitter must overtake each other sometimes
    inversions = sum(1 for a, b in zip(arrivals, arrivals[1:]) if b < a)
    assert inversions > 100
    mean_extra = sum(a - i * 0.0001 - 0.001 for i, a in enumerate(arrivals)) / len(arrivals)
    assert 0.0004 < mean_extra < 0.0006


def test_duplication():
    net = SimNetwork(NetConfig(duplicate=0.1), random.Random(5))
    copies = [len(net.route(0.0, 0, 1)) for _ in range(10_000)]
    assert set(copies) == {1, 2}
    assert 800 < copies.count(2) < 1200


def test_partition_blocks_only_across_sides_and_only_in_window():
    p = parse_partition("0-1|2-3@10-20", 5)
    net = SimNetwork(NetConfig(partitions=(p,)), random.Random(1))
    assert net.route(15.0, 0, 2) == ()
    assert net.route(15.0, 0, 1) != ()  # same side
    assert net.route(15.0, 0, 4) != ()  # member 4 is in no group: reaches everyone
    assert net.route(9.99, 0, 2) != ()
    assert net.route(20.0, 0, 2) != ()  # healed
    assert net.counters["partition"] == 1
    assert net.partition_explains(0, 25.0, grace=10.0)
    assert not net.partition_explains(0, 31.0, grace=10.0)
    assert not net.partition_explains(4, 15.0, grace=10.0)


def test_same_seed_same_network():
    def trace(seed):
        net = SimNetwork(NetConfig(loss=0.2, duplicate=0.1), random.Random(seed))
        return [net.route(i * 0.01, i % 7, (i + 1) % 7) for i in range(500)]

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)


@pytest.mark.parametrize(
    "text, value", [("0.05", 0.05), ("5%", 0.05), (" 12.5% ", 0.125), ("0", 0.0), ("1", 1.0)]
)
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-0.1", "1.5", "150%", "abc", "nan", "%"])
def test_parse_fraction_rejects(text):
    with pytest.raises(ValueError):
        parse_fraction(text)


def test_parse_partition_forms():
    p = parse_partition("30%@5-15", 10)
    assert p.groups == (frozenset(range(3)), frozenset(range(3, 10)))
    assert (p.start, p.end) == (5.0, 15.0)
    q = parse_partition("0,2,4|1,3@0-1", 5)
    assert q.groups == (frozenset({0, 2, 4}), frozenset({1, 3}))
    assert parse_partition(q.describe(), 5) == q


@pytest.mark.parametrize(
    "spec", ["0-4|5-9", "0-4|5-9@20-10", "0-4|4-9@1-2", "0-4|5-10@1-2", "0-9@1-2", "100%@1-2", "x|y@1-2"]
)
def test_parse_partition_rejects(spec):
    with pytest.raises(ValueError):
        parse_partition(spec, 10)


def test_starved_schedule_pauses_for_its_duty_and_queues_in_order():
    s = _Sched(random.Random(2), pause_max=1.0, duty=0.3, t0=0.0)
    step = 0.001
    paused = 0
    last_ready = 0.0
    for i in range(200_000):  # 200 s of simulated time
        t = i * step
        r = s.ready_at(t)
        assert r >= t and r - t <= 1.0
        assert r >= last_ready  # a later arrival is never handled before an earlier one
        last_ready = r
        paused += r > t
    assert 0.25 < paused / 200_000 < 0.35


def test_percentile_is_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 0.5) == 50.0
    assert percentile(xs, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


# --------------------------------------------------------------------------------------
# the simulator's bookkeeping, checked against a scripted member whose every event is
# known in advance (the protocol itself is exercised by the real-Node runs below)

# the simulator takes GROUP and FlowTuple from the module that defines the node class,
# which for ScriptedNode is this one
GROUP = object()


@dataclass(frozen=True)
class FlowTuple:
    client: str
    client_port: int
    vip: str
    vip_port: int
    proto: int


@dataclass
class _View:
    name: str
    status: str
    incarnation: int = 0


@dataclass
class _Ev:
    member: _View


class MemberDead(_Ev):
    pass


class MemberSuspect(_Ev):
    pass


@dataclass
class EvictionReceived:
    tuple: FlowTuple
    origin: str
    seq: int


@dataclass
class Outgoing:
    dest: object
    data: bytes


class ScriptedNode:
    """Every member knows all N from the start and pings one neighbour per second.

    ``script`` maps (observer name, virtual second) to events it reports then; an
    eviction is forwarded once to every member on publication (one datagram each)."""

    def __init__(self, spec: NodeSpec, n: int, script: dict):
        self.name, self.n, self.script = spec.name, n, script
        self.out: list[Outgoing] = []
        self.ev: list = []
        self.next = spec.now + 1.0

    def join(self, now):
        pass

    def tick(self, now):
        self.next = now + 1.0
        for ev in self.script.get((self.name, int(now - self.script["t0"])), []):
            self.ev.append(ev)
        self.out.append(Outgoing(("10.0.0.0", 7946) if self.name != "mix-0000" else ("10.0.0.1", 7946), b"x" * 50))

    def next_deadline(self):
        return self.next

    def handle_datagram(self, now, data, source):
        if data.startswith(b"E"):
            f = FlowTuple(*json.loads(data[1:]))
            self.ev.append(EvictionReceived(f, "?", 1))

    def publish_eviction(self, flow, now):
        body = b"E" + json.dumps([flow.client, flow.client_port, flow.vip, flow.vip_port, flow.proto]).encode()
        for i in range(self.n):
            name = f"mix-{i:04d}"
            if name != self.name:
                self.out.append(Outgoing((f"10.0.0.{i}", 7946), body))

    def take_outgoing(self):
        o, self.out = self.out, []
        return o

    def take_events(self):
        e, self.ev = self.ev, []
        return e

    def members(self):
        return [_View(f"mix-{i:04d}", "alive") for i in range(self.n) if f"mix-{i:04d}" != self.name]

    def usable_backends(self):
        return [f"mix-{i:04d}" for i in range(self.n)]

    def leave(self, now):
        pass


def test_bookkeeping_false_deaths_and_eviction_pairs():
    n = 6
    script: dict = {"t0": 1_700_000_000.0}
    # mix-0001 wrongly declares mix-0002 dead at second 5, and suspects mix-0003 at 6
    script[("mix-0001", 5)] = [MemberDead(_View("mix-0002", "dead"))]
    script[("mix-0001", 6)] = [MemberSuspect(_View("mix-0003", "suspect"))]
    cfg = SimConfig(nodes=n, seed=3, duration=20.0, evictions=4, loss=0.0, join_spread_s=0.0,
                    eviction_drain_s=2.0)
    sim = Sim(cfg, node_factory=lambda spec: ScriptedNode(spec, n, script))
    rep = sim.run().report()
    assert rep["false_deaths"] == 1
    assert rep["false_suspicions"] == 1
    assert rep["false_examples"][0][1:] == ["mix-0001", "MemberDead", "mix-0002"]
    # 4 evictions x 5 receivers each, all delivered one LAN hop later
    assert rep["evictions_published"] == 4
    assert rep["eviction_pairs"] == 20 and rep["eviction_missed"] == 0
    assert 0.0005 <= rep["eviction_p50_s"] < 0.01
    assert rep["converged"] is True
    # idle: one 50-byte datagram per member per second
    assert rep["idle_bytes_per_s_per_member"] == pytest.approx(50.0, rel=0.15)


def test_bookkeeping_crash_detection_times():
    n = 5
    t0 = 1_700_000_000.0
    script: dict = {"t0": t0}
    cfg = SimConfig(nodes=n, seed=9, duration=40.0, crash=1, join_spread_s=0.0)
    sim = Sim(cfg, node_factory=lambda spec: ScriptedNode(spec, n, script))
    at, _, idx = next(p for p in sim.plan if p[1] == "crash")
    victim = f"mix-{idx:04d}"
    observers = [f"mix-{i:04d}" for i in range(n) if i != idx]
    # every observer suspects at the 2nd whole second after the crash, declares dead at the 5th;
    # the last observer only ever suspects
    for k, o in enumerate(observers):
        script[(o, int(at) + 2)] = [MemberSuspect(_View(victim, "suspect"))]
        if k < len(observers) - 1:
            script[(o, int(at) + 5)] = [MemberDead(_View(victim, "dead"))]
    rep = sim.run().report()
    assert rep["detect_pairs"] == n - 1
    assert rep["suspect_p50_s"] == pytest.approx(int(at) + 2 - at, abs=1e-4)
    assert rep["dead_p99_s"] == pytest.approx(int(at) + 5 - at, abs=1e-4)
    assert rep["suspect_missed"] == 0 and rep["dead_missed"] == 1
    # not everyone declared it dead, so there is no "all members" time for death
    assert rep["dead_all_max_s"] is None
    assert rep["suspect_all_max_s"] == pytest.approx(int(at) + 2 - at, abs=1e-4)
    # detections of a crashed member are not false
    assert rep["false_deaths"] == 0 and rep["false_suspicions"] == 0
    assert rep["live_members"] == n - 1


def test_bookkeeping_undetected_crash_and_lost_evictions():
    n = 5
    script: dict = {"t0": 1_700_000_000.0}
    cfg = SimConfig(nodes=n, seed=9, duration=40.0, crash=1, loss=0.5, evictions=3, join_spread_s=0.0,
                    eviction_drain_s=2.0)
    rep = Sim(cfg, node_factory=lambda spec: ScriptedNode(spec, n, script)).run().report()
    # nobody reported anything: every pair is missed, and no percentile is invented
    assert rep["suspect_missed"] == n - 1 and rep["dead_missed"] == n - 1
    assert rep["suspect_p50_s"] is None and rep["dead_p99_s"] is None
    # 50% loss on single-shot eviction datagrams: some (eviction, member) pairs never arrive
    assert rep["eviction_missed"] > 0
    assert rep["eviction_pairs"] >= rep["eviction_missed"]
    assert rep["drops"]["net"]["loss"] > 0


# --------------------------------------------------------------------------------------
# whole clusters of the real protocol


def _run(**kw) -> dict:
    return Sim(SimConfig(**kw)).run().report()


@pytest.fixture(scope="module")
def lossy100() -> dict:
    return _run(nodes=100, loss=0.05, crash=2, evictions=30, seed=1, duration=60.0)


def test_real_cluster_uses_the_real_protocol(lossy100):
    from meshlb.cluster.node import Node
    from meshlb.cluster.wire import Wire

    sim = Sim(SimConfig(nodes=3, duration=2.0))
    sim.run()
    assert all(type(m.node) is Node and type(m.wire) is Wire for m in sim.members)
    # everything on the simulated wire is sealed: nothing of the member names is in clear
    assert lossy100["bytes_sent"] > 0 and lossy100["datagrams_sent"] > 0


def test_100_members_5pct_loss_converge(lossy100):
    r = lossy100
    assert r["converged"] is True
    assert r["converged_at_s"] is not None and r["converged_at_s"] <= 15.0
    assert r["live_members"] == 98
    assert r["drops"]["net"]["loss"] > 0  # the loss really happened


def test_100_members_5pct_loss_detect_the_crash(lossy100):
    r = lossy100
    assert r["detect_pairs"] == 2 * 99 or r["detect_pairs"] == 2 * 98  # second crash: one observer fewer
    # every live member marked every crashed member dead
    assert r["dead_missed"] == 0 and r["suspect_missed"] == 0
    assert r["dead_all_max_s"] is not None
    assert 0 < r["suspect_p50_s"] <= r["dead_p50_s"] <= r["dead_p99_s"]


def test_100_members_5pct_loss_no_false_deaths(lossy100):
    assert lossy100["false_deaths"] == 0, lossy100["false_examples"]
    assert lossy100["false_death_events"] == 0


def test_100_members_5pct_loss_every_eviction_reaches_every_member_by_gossip(lossy100):
    r = lossy100
    assert r["evictions_published"] == 30
    assert r["eviction_pairs"] >= 30 * 97
    assert r["eviction_missed"] == 0
    assert r["eviction_p99_s"] < 2.0


def test_multicast_evictions_reach_everyone_fast():
    r = _run(nodes=100, loss=0.05, multicast=True, evictions=30, seed=2, duration=40.0)
    assert r["group"] is True and r["multicast"] is True
    assert r["eviction_missed"] == 0
    # one LAN hop through the group for 95% of the copies; the rest is repaired by gossip
    assert r["eviction_p50_s"] < 0.005
    assert r["converged"] is True


def test_partition_heals():
    r = _run(nodes=40, loss=0.01, seed=3, duration=150.0,
             partitions=(parse_partition("50%@20-45", 40),))
    # the cut was real: members on each side gave up on the other
    assert r["partition_deaths"] > 0 or r["partition_suspicions"] > 0
    assert r["drops"]["net"]["partition"] > 0
    # and after healing everyone sees everyone alive, with the same usable set
    assert r["converged"] is True
    assert r["false_deaths"] == 0


def test_starved_members_cause_no_false_deaths():
    r = _run(nodes=100, loss=0.01, starved=0.10, crash=1, seed=4, duration=60.0)
    assert r["false_deaths"] == 0, r["false_examples"]
    # the starvation was felt (pauses up to 1 s are longer than the 0.5 s probe timeout) ...
    assert r["false_suspicions"] > 0
    # ... and the real crash is still found by everyone (agreement at the very end is not
    # asked for: a member paused at that moment is rightly suspected)
    assert r["dead_missed"] == 0


def test_restart_and_graceful_leave():
    r = _run(nodes=30, crash=2, restart=1, restart_after_s=10.0, leave=1, seed=5, duration=90.0)
    # the restarted member is back in everyone's view; the one that left is gone from it
    assert r["converged"] is True
    assert r["live_members"] == 28
    assert r["false_deaths"] == 0


def test_same_seed_same_report_in_process():
    cfg = dict(nodes=30, loss=0.05, crash=1, evictions=5, starved=0.1, seed=7, duration=40.0)
    a = Sim(SimConfig(**cfg)).run().report(timing=False)
    b = Sim(SimConfig(**cfg)).run().report(timing=False)
    assert json.dumps(a) == json.dumps(b)
    assert not set(TIMING_KEYS) & set(a)
    c = Sim(SimConfig(**{**cfg, "seed": 8})).run().report(timing=False)
    assert json.dumps(a) != json.dumps(c)


def test_same_seed_same_json_across_processes():
    # a different PYTHONHASHSEED reorders every set of strings: the result must not care
    args = [sys.executable, "-m", "meshlb.cli", "sim", "--nodes", "20", "--loss", "5%", "--crash", "1",
            "--evictions", "5", "--seed", "3", "--duration", "30", "--no-timing"]
    outs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    assert outs[0] == outs[1]
    json.loads(outs[0])


def test_warm_start_matches_its_scenario():
    sim = Sim(SimConfig(nodes=30, seed=6, duration=10.0))
    sim.run_until(10.0)
    sim.continue_with(SimConfig(nodes=30, seed=6, duration=40.0, crash=1, evictions=5, loss=0.01))
    r = sim.run().report()
    assert r["warm_start_s"] == 10.0
    assert r["dead_missed"] == 0 and r["eviction_missed"] == 0
    assert r["converged"] is True
    # the measurement restarted with the scenario: idle window and events are in its own time
    assert r["idle_window_s"] == [10.0, 16.0]

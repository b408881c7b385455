"""Deterministic discrete-event simulator of a meshlb cluster.

N members run in one process on a virtual clock, each a real ``meshlb.cluster.node.Node``
behind a real ``Wire`` (authenticated encryption, replay window, rate limits): nothing
of the protocol is mocked. Only the network (``simnet``) and time are simulated.

One heap orders everything that happens: datagram arrivals, each node's own deadline
(``next_deadline()``), and scenario actions (joins, crashes, restarts, leaves, evictions,
convergence checks). Ties break on insertion order, and every random draw comes from a
``random.Random`` seeded from the run seed (one for the network, one for the scenario,
one per node life), so the same ``SimConfig`` gives the same result in any process.

Starved nodes model a member that is descheduled (CPU steal, GC pause, throttled cgroup):
each alternates awake periods (exponential, mean chosen so the member is paused for
``starve_duty`` of the time) and paused periods (uniform in [0, starve_pause_s]).
Anything that reaches a paused member -- datagrams and its own timers -- waits in its
queue, in arrival order, and is handled when it wakes up.

The result (``SimResult.report()``) is a flat dict with stable keys:

inputs
    nodes, seed, duration, preset, loss, duplicate, latency_ms, jitter_ms, crash,
    restart, leave, starved, starve_pause_s, multicast (the network delivers GROUP
    datagrams), group (members were built with a group), warm_start_s (0, or how long
    the cluster ran before this scenario: ``Sim.continue_with``), evictions, partitions
failure detection (over every (live observer, crashed member) pair; seconds after the crash)
    suspect_p50_s, suspect_p99_s      first suspicion (or death, if no suspicion came first)
    dead_p50_s, dead_p99_s            declared dead
    suspect_all_max_s, dead_all_max_s time until the *last* live member saw it, worst crash
    dead_all_p50_s                    the same, median over crashes
    suspect_missed, dead_missed       pairs never detected before the end of the run
    detect_pairs                      number of pairs
    false_suspicions, false_deaths    suspicions/deaths of a running member (its current
                                      life), not explained by a partition; counted once per
                                      (member, incarnation) however many members adopted it
    false_suspicion_events, false_death_events  the same, counted per reporting member
    false_examples                    up to 5 [time, observer, event, member]
    partition_suspicions, partition_deaths  like false_*, but explained by a partition
                                      (active, or healed less than ``partition_grace_s`` ago)
dissemination (over every (eviction, live member other than the origin) pair)
    evictions_published, eviction_pairs, eviction_p50_s, eviction_p99_s, eviction_max_s,
    eviction_missed
cost
    idle_bytes_per_s_per_member       UDP payload bytes sent, idle window, per member
    idle_datagrams_per_s_per_member   datagrams in the same window (add 28 B each for
                                      IPv4+UDP headers)
    idle_window_s                     [start, end] of that window
    datagrams_sent, bytes_sent        whole run
    cpu_s_per_member_per_s            process CPU inside Node calls / N / simulated seconds
    idle_cpu_s_per_member_per_s       the same over the idle window only
convergence
    converged                         at the end: every live member sees every other live
                                      member alive, and all report the same usable_backends
    converged_at_s                    first check at which that held (null if never)
    live_members
drops
    drops.net                         network: loss, partition, member down, no route, ...
    drops.wire                        sum of every Wire's ``drops`` counter by reason
wall clock (the only keys that differ between two runs of the same seed; TIMING_KEYS)
    cpu_s_per_member_per_s, idle_cpu_s_per_member_per_s, cpu_s_total, wall_s

Percentiles are nearest-rank; a percentile over no samples is null.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlb.cluster.simnet import NetConfig, Partition, SimNetwork

__all__ = ["SimConfig", "Sim", "SimResult", "NodeSpec", "run", "TIMING_KEYS", "PRESETS", "percentile"]

TIMING_KEYS = ("cpu_s_per_member_per_s", "idle_cpu_s_per_member_per_s", "cpu_s_total", "wall_s")

# default one-way latency and mean jitter of the network that goes with each protocol preset
PRESETS: dict[str, tuple[float, float]] = {
    "lan": (0.0005, 0.0002),
    "wan": (0.030, 0.010),
    "local": (0.00005, 0.00002),
}

_DELIVER, _TIMER, _ACTION = 0, 1, 2


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(p * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


def _rounded(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class SimConfig:
    nodes: int = 10
    seed: int = 1
    duration: float = 60.0
    preset: str = "lan"
    loss: float = 0.0
    duplicate: float = 0.0
    latency_s: float | None = None  # None: the preset's network
    jitter_s: float | None = None
    crash: int = 0
    restart: int = 0  # of the crashed members, how many come back
    restart_after_s: float = 20.0
    leave: int = 0
    starved: float = 0.0  # fraction of members that are descheduled now and then
    starve_pause_s: float = 1.0
    starve_duty: float = 0.3
    # the network delivers GROUP datagrams (multicast on the segment)
    multicast: bool = False
    # members are built with a group (Node(group=True)); None: the same as multicast.
    # Group-capable members on a network without multicast is "evictions by gossip
    # alone" for members configured for multicast whose group is broken or filtered.
    group: bool | None = None
    partitions: tuple[Partition, ...] = ()
    evictions: int = 0
    # each member is given this many already-started members as --peers
    peers_per_node: int = 3
    # members start one after another over this many seconds
    join_spread_s: float = 2.0
    # phases, as fractions of duration: idle window (no crash, no eviction), then events
    idle_from: float = 0.25
    idle_to: float = 0.40
    events_from: float = 0.40
    crash_to: float = 0.50
    # the same in seconds: (idle from, idle to); events start when the idle window ends
    idle_window_s: tuple[float, float] | None = None
    # evictions stop this long before the end so they have time to arrive
    eviction_drain_s: float = 5.0
    partition_grace_s: float = 60.0
    check_interval_s: float | None = None  # None: scale with N
    max_datagram: int = 1400

    def validate(self) -> None:
        if self.idle_window_s is not None:
            a, b = self.idle_window_s
            if not (0 <= a < b <= self.duration):
                raise ValueError(f"idle window {a:g}-{b:g} must lie within the {self.duration:g} s run")
            self.idle_from, self.idle_to = a / self.duration, b / self.duration
            self.events_from = self.idle_to
            self.crash_to = min(1.0, self.events_from + 0.1)
        if self.nodes < 2:
            raise ValueError("nodes must be at least 2")
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError("duration must be a positive number of seconds")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}")
        for name in ("loss", "duplicate", "starved", "starve_duty"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1")
        if self.loss >= 1.0:
            raise ValueError("loss must be below 1 (nothing would ever arrive)")
        if self.starve_duty >= 1.0:
            raise ValueError("starve_duty must be below 1 (a starved member must run sometimes)")
        for name in ("crash", "restart", "leave", "evictions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.crash + self.leave > self.nodes - 2:
            raise ValueError(f"crash + leave must leave at least 2 of the {self.nodes} members running")
        if self.restart > self.crash:
            raise ValueError("restart cannot exceed crash (only crashed members restart)")
        if not (0 <= self.idle_from <= self.idle_to <= self.events_from <= self.crash_to <= 1):
            raise ValueError("phase fractions must satisfy idle_from <= idle_to <= events_from <= crash_to <= 1")
        for p in self.partitions:
            for g in p.groups:
                if max(g) >= self.nodes:
                    raise ValueError(f"partition {p.describe()} names a member beyond {self.nodes - 1}")

    def net(self) -> NetConfig:
        lat, jit = PRESETS[self.preset]
        return NetConfig(
            latency_s=lat if self.latency_s is None else self.latency_s,
            jitter_s=jit if self.jitter_s is None else self.jitter_s,
            loss=self.loss,
            duplicate=self.duplicate,
            multicast=self.multicast,
            partitions=tuple(self.partitions),
        )


@dataclass
class NodeSpec:
    """Everything needed to build one life of one member."""

    index: int
    name: str
    address: tuple[str, int]
    key: bytes
    label: str
    epoch: int
    incarnation: int
    rng: random.Random
    now: float
    peers: tuple[tuple[str, int], ...]
    group: bool
    preset: str
    max_datagram: int
    # set by the factory so the simulator can read the Wire's drop counters
    wire: Any = None


def real_node_factory(spec: NodeSpec) -> Any:
    """A real ``Node`` behind a real ``Wire``; imported late so the CLI can be listed
    (``meshlb --help``) even where the protocol does not import."""
    from meshlb.cluster.keyring import Keyring
    from meshlb.cluster.node import MemberMeta, Node
    from meshlb.cluster.protocol_config import ProtocolConfig
    from meshlb.cluster.wire import Wire

    wire = spec.wire = Wire(label=spec.label, keyring=Keyring(spec.key), sender=spec.name, epoch=spec.epoch,
                max_datagram=spec.max_datagram)
    config = ProtocolConfig.preset(spec.preset)
    return Node(name=spec.name, address=spec.address, wire=wire, config=config, rng=spec.rng,
                now=spec.now, meta=MemberMeta(vips=("10.255.0.1",)), incarnation=spec.incarnation,
                peers=spec.peers, group=spec.group)


class _Sched:
    """Pause schedule of a starved member: alternating awake / paused intervals."""

    __slots__ = ("rng", "pause_max", "awake_mean", "pause_start", "pause_end")

    def __init__(self, rng: random.Random, pause_max: float, duty: float, t0: float) -> None:
        self.rng = rng
        self.pause_max = pause_max
        mean_pause = pause_max / 2.0
        self.awake_mean = mean_pause * (1.0 - duty) / duty if duty > 0 else math.inf
        self.pause_start = t0
        self.pause_end = t0
        self._advance()

    def _advance(self) -> None:
        if math.isinf(self.awake_mean):
            self.pause_start = self.pause_end = math.inf
            return
        self.pause_start = self.pause_end + self.rng.expovariate(1.0 / self.awake_mean)
        self.pause_end = self.pause_start + self.rng.uniform(0.0, self.pause_max)

    def ready_at(self, t: float) -> float:
        """When the member can handle something that reached it at ``t`` (queries arrive in
        time order, so the schedule only ever moves forward)."""
        while t >= self.pause_end:
            self._advance()
        return self.pause_end if t >= self.pause_start else t


class _Member:
    __slots__ = ("idx", "name", "address", "node", "up", "leaving", "life", "life_inc", "down",
                 "timer_at", "timer_gen", "sched", "bytes_sent", "dgrams_sent", "started", "wire")

    def __init__(self, idx: int, name: str, address: tuple[str, int]) -> None:
        self.idx = idx
        self.name = name
        self.address = address
        self.node: Any = None
        self.wire: Any = None
        self.up = False
        self.leaving = False
        self.started = False
        self.life = 0
        self.life_inc = 0
        # closed/open intervals [start, end) in which the member was not running
        self.down: list[list[float]] = []
        self.timer_at: float | None = None
        self.timer_gen = 0
        self.sched: _Sched | None = None
        self.bytes_sent = 0
        self.dgrams_sent = 0

    def up_throughout(self, t0: float, t1: float) -> bool:
        if not self.started:
            return False
        for s, e in self.down:
            if s < t1 and e > t0:
                return False
        return True


@dataclass
class _Crash:
    idx: int
    at: float
    observers: list[int]
    suspect: dict[int, float] = field(default_factory=dict)
    dead: dict[int, float] = field(default_factory=dict)
    until: float = math.inf  # restart time: detection after that is about the new life


@dataclass
class _Eviction:
    flow: Any
    origin: int
    at: float
    arrivals: dict[int, float] = field(default_factory=dict)


@dataclass
class SimResult:
    data: dict[str, Any]

    def report(self, timing: bool = True) -> dict[str, Any]:
        if timing:
            return dict(self.data)
        return {k: v for k, v in self.data.items() if k not in TIMING_KEYS}


class Sim:
    def __init__(self, config: SimConfig, node_factory: Callable[[NodeSpec], Any] | None = None) -> None:
        config.validate()
        self.cfg = config
        self.factory = node_factory or real_node_factory
        seed = config.seed
        self.net = SimNetwork(config.net(), random.Random(f"meshlb-sim:{seed}:net"))
        self.scn = random.Random(f"meshlb-sim:{seed}:scenario")
        self.key = hashlib.sha256(f"meshlb-sim:{seed}:key".encode()).digest()
        self.label = "meshlb-sim"
        self.t0 = 1_700_000_000.0  # virtual epoch: a plausible wall-clock time for the protocol
        # time zero of the current scenario: t0, or later after a warm start (continue_with)
        self.origin = self.net.origin = self.t0
        self.end = self.t0 + config.duration
        self.now = self.t0
        self.group_capable = config.multicast if config.group is None else config.group
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        n = config.nodes
        self.members = [
            _Member(i, f"mix-{i:04d}", (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 7946))
            for i in range(n)
        ]
        self.by_addr = {m.address: m.idx for m in self.members}
        self.by_name = {m.name: m.idx for m in self.members}
        self.netdrops: Counter[str] = Counter()
        self.wiredrops: Counter[str] = Counter()
        self.group_sentinel: Any = None
        self.flow_type: Any = None
        self._reset_measurements()
        self._plan_joins()
        self._plan_scenario()

    def _reset_measurements(self) -> None:
        self.cpu = 0.0
        self.crashes: dict[int, _Crash] = {}
        self.evictions: dict[Any, _Eviction] = {}
        # a false suspicion/death is counted once per (member, life, incarnation) however
        # many members adopt it; *_events counts every member that reported it
        self.false_suspicions: set[tuple[int, int, int]] = set()
        self.false_deaths: set[tuple[int, int, int]] = set()
        self.false_suspicion_events = 0
        self.false_death_events = 0
        self.partition_suspicions: set[tuple[int, int, int]] = set()
        self.partition_deaths: set[tuple[int, int, int]] = set()
        self.false_detail: list[tuple[float, str, str, str]] = []
        self.converged_at: float | None = None
        self.idle_mark: tuple[int, int] | None = None
        self.idle_totals: tuple[int, int] | None = None
        self.idle_live_from: list[int] = []
        self.idle_cpu0 = self.idle_cpu = 0.0
        self.base_sent = (sum(m.bytes_sent for m in self.members), sum(m.dgrams_sent for m in self.members))
        self.base_wiredrops = self._wire_drops_total()
        self.net.counters.clear()
        self.netdrops.clear()

    def _wire_drops_total(self) -> Counter[str]:
        total = Counter(self.wiredrops)
        for m in self.members:
            if m.up:
                total.update(_wire_drops(m.wire))
        return total

    def continue_with(self, config: SimConfig) -> None:
        """Warm start: run ``config``'s scenario from the current state of this cluster.

        A big cluster's join costs O(N^2 log N) messages (every member's alive spreads to
        every member), far more than a minute of steady state, so a benchmark joins once
        (``run_until``) and runs each scenario from that state, e.g. in forked processes.
        Network, starvation, events and measurements come from ``config``; members keep
        their state, and with it the group capability they were built with.
        """
        config.validate()
        if config.nodes != self.cfg.nodes:
            raise ValueError("a warm start keeps the number of members")
        # scheduled actions belong to the previous scenario (joins are long done)
        self._heap = [e for e in self._heap if e[2] != _ACTION]
        heapq.heapify(self._heap)
        self.cfg = config
        self.origin = self.now
        self.end = self.origin + config.duration
        self.net.config = config.net()
        self.net.origin = self.origin
        self.scn = random.Random(f"meshlb-sim:{config.seed}:scenario:warm")
        for m in self.members:
            m.sched = None
        self._reset_measurements()
        self._plan_scenario()

    # -- scheduling -------------------------------------------------------------------

    def _push(self, t: float, kind: int, idx: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, idx, payload))

    def _at(self, rel: float, fn: Callable[[float], None]) -> None:
        self._push(self.origin + rel, _ACTION, -1, fn)

    def _plan_joins(self) -> None:
        n = self.cfg.nodes
        for i in range(n):
            self._at(self.cfg.join_spread_s * i / n, functools.partial(self._start, i, first=True))

    def _plan_scenario(self) -> None:
        cfg, scn, n = self.cfg, self.scn, self.cfg.nodes
        T = cfg.duration
        # (seconds from start, what, member index) of every scripted crash/restart/leave
        self.plan: list[tuple[float, str, int]] = []
        order = list(range(n))
        scn.shuffle(order)
        crashed = order[: cfg.crash]
        leaving = order[cfg.crash: cfg.crash + cfg.leave]
        rest = order[cfg.crash + cfg.leave:]
        n_starved = round(cfg.starved * n)
        self.starved = sorted(rest[:n_starved])
        for i in self.starved:
            sched_rng = random.Random(f"meshlb-sim:{cfg.seed}:sched:{i}")
            self.members[i].sched = _Sched(sched_rng, cfg.starve_pause_s, cfg.starve_duty, self.origin)
        lo, hi = cfg.events_from * T, cfg.crash_to * T
        for k, i in enumerate(crashed):
            at = scn.uniform(lo, hi)
            self._at(at, functools.partial(self._crash, i))
            self.plan.append((at, "crash", i))
            if k < cfg.restart:
                self._at(at + cfg.restart_after_s, functools.partial(self._restart, i))
                self.plan.append((at + cfg.restart_after_s, "restart", i))
        for i in leaving:
            at = scn.uniform(lo, hi)
            self._at(at, functools.partial(self._leave, i))
            self.plan.append((at, "leave", i))
        ev_hi = max(lo, T - cfg.eviction_drain_s)
        for k in range(cfg.evictions):
            self._at(scn.uniform(lo, ev_hi), functools.partial(self._evict, k))
        self._at(cfg.idle_from * T, self._idle_start)
        self._at(cfg.idle_to * T, self._idle_end)
        self.check_interval = cfg.check_interval_s or max(1.0, n / 100.0)
        self._at(self.check_interval, self._check)

    # -- node calls -------------------------------------------------------------------

    def _after(self, m: _Member, t: float, cpu0: float) -> None:
        """Collect what a node call produced; ``cpu0`` is the process time at its start."""
        node = m.node
        out = node.take_outgoing()
        evs = node.take_events()
        d = node.next_deadline()
        self.cpu += time.process_time() - cpu0
        for o in out:
            self._send(m, t, o)
        if evs:
            self._on_events(m, t, evs)
        if not m.up:
            return
        if d is not None and d != m.timer_at and math.isfinite(d):
            if d <= t:
                # a deadline that is already due must still move time forward, or a node
                # that keeps reporting one would stall the simulation
                d = t + 1e-6
            m.timer_gen += 1
            m.timer_at = d
            self._push(d, _TIMER, m.idx, m.timer_gen)

    def _send(self, m: _Member, t: float, o: Any) -> None:
        data = o.data
        m.bytes_sent += len(data)
        m.dgrams_sent += 1
        dest = o.dest
        src = m.idx
        route = self.net.route
        if dest is self.group_sentinel:
            if not self.cfg.multicast:
                self.netdrops["group_disabled"] += 1
                return
            for j in range(self.cfg.nodes):
                if j != src:
                    for at in route(t, src, j):
                        self._push(at, _DELIVER, j, (src, data))
            return
        dst = self.by_addr.get(tuple(dest))
        if dst is None:
            self.netdrops["no_route"] += 1
            return
        for at in route(t, src, dst):
            self._push(at, _DELIVER, dst, (src, data))

    def _start(self, i: int, t: float, first: bool, incarnation: int = 0) -> None:
        m = self.members[i]
        cfg = self.cfg
        m.life += 1
        if first:
            earlier = list(range(i))
        else:
            earlier = [j for j in range(cfg.nodes) if j != i and self.members[j].up]
        k = min(cfg.peers_per_node, len(earlier))
        peers = tuple(self.members[j].address for j in self.scn.sample(earlier, k))
        spec = NodeSpec(
            index=i, name=m.name, address=m.address, key=self.key, label=self.label,
            # the Wire's epoch is the boot time in ns, which only grows across restarts
            epoch=int(round(t * 1e9)), incarnation=incarnation,
            rng=random.Random(f"meshlb-sim:{cfg.seed}:node:{i}:{m.life}"),
            now=t, peers=peers, group=self.group_capable, preset=cfg.preset, max_datagram=cfg.max_datagram,
        )
        c0 = time.process_time()
        m.node = self.factory(spec)
        m.wire = spec.wire
        if self.group_sentinel is None:
            self.group_sentinel = _proto_attr(m.node, "GROUP")
            self.flow_type = _proto_attr(m.node, "FlowTuple")
        m.up = True
        m.started = True
        m.leaving = False
        m.life_inc = incarnation
        m.timer_at = None
        if m.down and m.down[-1][1] == math.inf:
            m.down[-1][1] = t
        m.node.join(t)
        self._after(m, t, c0)

    def _stop(self, m: _Member, t: float) -> None:
        m.up = False
        m.timer_gen += 1
        m.timer_at = None
        m.down.append([t, math.inf])
        self.wiredrops.update(_wire_drops(m.wire))

    def _crash(self, i: int, t: float) -> None:
        m = self.members[i]
        if not m.up:
            return
        self._stop(m, t)
        observers = [o.idx for o in self.members if o.up]
        self.crashes[i] = _Crash(idx=i, at=t, observers=observers)

    def _restart(self, i: int, t: float) -> None:
        m = self.members[i]
        if m.up:
            return
        rec = self.crashes.get(i)
        if rec is not None:
            rec.until = t
        inc = _own_incarnation(m.node, m.name, m.life_inc) + 1
        self._start(i, t, first=False, incarnation=inc)

    def _leave(self, i: int, t: float) -> None:
        m = self.members[i]
        if not m.up:
            return
        m.leaving = True
        c0 = time.process_time()
        m.node.leave(t)
        self._after(m, t, c0)
        # keep answering a little while, as an agent does while its goodbye spreads
        self._push(t + 2.0, _ACTION, -1, lambda t2, m=m: self._stop(m, t2) if m.up else None)

    def _evict(self, k: int, t: float) -> None:
        live = [m for m in self.members if m.up and not m.leaving]
        if not live:
            return
        m = live[self.scn.randrange(len(live))]
        flow = _flow_tuple(self.flow_type, self.scn)
        self.evictions[flow] = _Eviction(flow=flow, origin=m.idx, at=t)
        c0 = time.process_time()
        m.node.publish_eviction(flow, t)
        self._after(m, t, c0)

    # -- observations -----------------------------------------------------------------

    def _on_events(self, m: _Member, t: float, evs: list[Any]) -> None:
        for ev in evs:
            kind = type(ev).__name__
            if kind == "EvictionReceived":
                rec = self.evictions.get(ev.tuple)
                if rec is not None and m.idx not in rec.arrivals:
                    rec.arrivals[m.idx] = t
            elif kind == "MemberSuspect" or kind == "MemberDead":
                j = self.by_name.get(ev.member.name)
                if j is None or j == m.idx:
                    continue
                dead = kind == "MemberDead"
                subj = self.members[j]
                crash = self.crashes.get(j)
                if not subj.up:
                    if crash is not None and crash.at <= t < crash.until:
                        if m.idx not in crash.suspect:
                            crash.suspect[m.idx] = t
                        if dead and m.idx not in crash.dead:
                            crash.dead[m.idx] = t
                    continue
                if subj.leaving:
                    continue
                # news about an earlier life (a restart raised the incarnation) is not false
                if getattr(ev.member, "incarnation", subj.life_inc) < subj.life_inc:
                    continue
                episode = (j, subj.life, getattr(ev.member, "incarnation", -1))
                if self.net.partition_explains(j, t, self.cfg.partition_grace_s):
                    (self.partition_deaths if dead else self.partition_suspicions).add(episode)
                    continue
                if dead:
                    self.false_deaths.add(episode)
                    self.false_death_events += 1
                else:
                    self.false_suspicions.add(episode)
                    self.false_suspicion_events += 1
                if len(self.false_detail) < 50:
                    self.false_detail.append((round(t - self.origin, 4), m.name, kind, subj.name))

    def _idle_start(self, t: float) -> None:
        self.idle_mark = (sum(m.bytes_sent for m in self.members), sum(m.dgrams_sent for m in self.members))
        self.idle_cpu0 = self.cpu
        self.idle_live_from = [m.idx for m in self.members if m.up]

    def _idle_end(self, t: float) -> None:
        if self.idle_mark is None:
            return
        b = sum(m.bytes_sent for m in self.members) - self.idle_mark[0]
        d = sum(m.dgrams_sent for m in self.members) - self.idle_mark[1]
        self.idle_totals = (b, d)
        self.idle_cpu = self.cpu - self.idle_cpu0

    def converged_now(self) -> bool:
        live = [m for m in self.members if m.up and not m.leaving]
        names = {m.name for m in live}
        usable: frozenset[str] | None = None
        for m in live:
            seen = {v.name for v in m.node.members() if v.status == "alive" and v.name != m.name}
            if seen != names - {m.name}:
                return False
            u = frozenset(m.node.usable_backends())
            if usable is None:
                usable = u
            elif u != usable:
                return False
        return True

    def _check(self, t: float) -> None:
        if self.converged_at is None:
            started = all(m.started for m in self.members)
            if started and self.converged_now():
                self.converged_at = t - self.origin
                return
        self._push(t + self.check_interval, _ACTION, -1, self._check)

    # -- main loop --------------------------------------------------------------------

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        self.run_until(self.end - self.origin)
        self.now = self.end
        wall = time.perf_counter() - wall0
        return SimResult(self._report(wall))

    def run_until(self, rel: float) -> None:
        """Process everything up to ``rel`` seconds after the scenario's start."""
        heap = self._heap
        pop = heapq.heappop
        push = self._push
        members = self.members
        end = min(self.end, self.origin + rel)
        net = self.net
        has_partitions = bool(self.cfg.partitions)
        ptime = time.process_time
        while heap:
            if heap[0][0] > end:
                break
            t, _, kind, idx, payload = pop(heap)
            self.now = t
            if kind == _DELIVER:
                m = members[idx]
                if not m.up:
                    self.netdrops["member_down"] += 1
                    continue
                src, data = payload
                if has_partitions and net.blocked(src, idx, t):
                    self.netdrops["partition_in_flight"] += 1
                    continue
                if m.sched is not None:
                    w = m.sched.ready_at(t)
                    if w > t:
                        push(w, _DELIVER, idx, payload)
                        continue
                c0 = ptime()
                m.node.handle_datagram(t, data, members[src].address)
                self._after(m, t, c0)
            elif kind == _TIMER:
                m = members[idx]
                if not m.up or payload != m.timer_gen:
                    continue
                if m.sched is not None:
                    w = m.sched.ready_at(t)
                    if w > t:
                        push(w, _TIMER, idx, payload)
                        continue
                m.timer_at = None
                c0 = ptime()
                m.node.tick(t)
                self._after(m, t, c0)
            else:
                payload(t)
        # the clock reaches ``end`` even when nothing happens at that very instant
        self.now = max(self.now, end)

    # -- report -----------------------------------------------------------------------

    def _report(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        end = self.end
        T = cfg.duration
        n = cfg.nodes
        sus, dead = [], []
        sus_missed = dead_missed = 0
        sus_all: list[float] = []
        dead_all: list[float] = []
        pairs = 0
        for i in sorted(self.crashes):
            rec = self.crashes[i]
            horizon = min(end, rec.until)
            worst_s = worst_d = 0.0
            complete_s = complete_d = True
            for o in rec.observers:
                om = self.members[o]
                ts = rec.suspect.get(o)
                td = rec.dead.get(o)
                # an observer that itself went down before detecting cannot be blamed
                if not om.up_throughout(rec.at, td if td is not None else horizon):
                    continue
                pairs += 1
                if ts is None:
                    sus_missed += 1
                    complete_s = False
                else:
                    sus.append(ts - rec.at)
                    worst_s = max(worst_s, ts - rec.at)
                if td is None:
                    dead_missed += 1
                    complete_d = False
                else:
                    dead.append(td - rec.at)
                    worst_d = max(worst_d, td - rec.at)
            if complete_s:
                sus_all.append(worst_s)
            if complete_d:
                dead_all.append(worst_d)
        sus.sort()
        dead.sort()
        dead_all.sort()
        sus_all.sort()

        ev_lat: list[float] = []
        ev_missed = ev_pairs = 0
        for ev in self.evictions.values():
            for m in self.members:
                if m.idx == ev.origin or m.leaving:
                    continue
                if not m.up_throughout(ev.at, end):
                    continue
                ev_pairs += 1
                got = ev.arrivals.get(m.idx)
                if got is None:
                    ev_missed += 1
                else:
                    ev_lat.append(got - ev.at)
        ev_lat.sort()

        idle_b = idle_d = idle_cpu = None
        window = (cfg.idle_from * T, cfg.idle_to * T)
        if self.idle_totals is not None and window[1] > window[0]:
            span = window[1] - window[0]
            # members present for the whole window; at the start of a run that is all of them
            k = max(1, len(self.idle_live_from))
            idle_b = self.idle_totals[0] / span / k
            idle_d = self.idle_totals[1] / span / k
            idle_cpu = self.idle_cpu / span / k

        live = [m for m in self.members if m.up and not m.leaving]
        converged = bool(live) and all(m.started for m in self.members) and self.converged_now()
        wire_drops = self._wire_drops_total()
        wire_drops.subtract(self.base_wiredrops)
        wire_drops = +wire_drops
        net_drops = Counter(self.net.counters)
        net_drops.update(self.netdrops)

        return {
            "nodes": n,
            "seed": cfg.seed,
            "duration": T,
            "preset": cfg.preset,
            "loss": cfg.loss,
            "duplicate": cfg.duplicate,
            "latency_ms": round(self.net.config.latency_s * 1000, 4),
            "jitter_ms": round(self.net.config.jitter_s * 1000, 4),
            "crash": cfg.crash,
            "restart": cfg.restart,
            "leave": cfg.leave,
            "starved": cfg.starved,
            "starve_pause_s": cfg.starve_pause_s,
            "multicast": cfg.multicast,
            "group": self.group_capable,
            "warm_start_s": round(self.origin - self.t0, 3),
            "evictions": cfg.evictions,
            "partitions": [p.describe() for p in cfg.partitions],
            "suspect_p50_s": _rounded(percentile(sus, 0.50)),
            "suspect_p99_s": _rounded(percentile(sus, 0.99)),
            "dead_p50_s": _rounded(percentile(dead, 0.50)),
            "dead_p99_s": _rounded(percentile(dead, 0.99)),
            "suspect_all_max_s": _rounded(sus_all[-1] if sus_all else None),
            "dead_all_p50_s": _rounded(percentile(dead_all, 0.50)),
            "dead_all_max_s": _rounded(dead_all[-1] if dead_all else None),
            "suspect_missed": sus_missed,
            "dead_missed": dead_missed,
            "detect_pairs": pairs,
            "false_suspicions": len(self.false_suspicions),
            "false_deaths": len(self.false_deaths),
            "false_suspicion_events": self.false_suspicion_events,
            "false_death_events": self.false_death_events,
            "partition_suspicions": len(self.partition_suspicions),
            "partition_deaths": len(self.partition_deaths),
            "false_examples": [list(x) for x in self.false_detail[:5]],
            "evictions_published": len(self.evictions),
            "eviction_pairs": ev_pairs,
            "eviction_p50_s": _rounded(percentile(ev_lat, 0.50), 5),
            "eviction_p99_s": _rounded(percentile(ev_lat, 0.99), 5),
            "eviction_max_s": _rounded(ev_lat[-1] if ev_lat else None, 5),
            "eviction_missed": ev_missed,
            "idle_bytes_per_s_per_member": _rounded(idle_b, 1),
            "idle_datagrams_per_s_per_member": _rounded(idle_d, 3),
            "idle_window_s": [window[0], window[1]],
            "datagrams_sent": sum(m.dgrams_sent for m in self.members) - self.base_sent[1],
            "bytes_sent": sum(m.bytes_sent for m in self.members) - self.base_sent[0],
            "converged": converged,
            "converged_at_s": _rounded(self.converged_at, 3),
            "live_members": len(live),
            "drops": {"net": dict(sorted(net_drops.items())),
                      "wire": dict(sorted((str(getattr(k, "value", k)), v) for k, v in wire_drops.items()))},
            "cpu_s_per_member_per_s": round(self.cpu / n / T, 6),
            "idle_cpu_s_per_member_per_s": None if idle_cpu is None else round(idle_cpu, 6),
            "cpu_s_total": round(self.cpu, 3),
            "wall_s": round(wall, 3),
        }


# -- helpers that read the protocol's objects ----------------------------------------


def _proto_attr(node: Any, name: str) -> Any:
    """A name (GROUP, FlowTuple) from the module that defines the node class, so the
    simulator speaks the same types as whatever factory built the nodes."""
    import sys

    mod = sys.modules.get(type(node).__module__)
    return getattr(mod, name, None) if mod is not None else None


def _wire_drops(wire: Any) -> Counter[str]:
    drops = getattr(wire, "drops", None)
    return Counter({str(getattr(k, "value", k)): int(v) for k, v in drops.items()}) if drops else Counter()


def _own_incarnation(node: Any, name: str, default: int) -> int:
    try:
        for v in node.members():
            if v.name == name:
                return int(v.incarnation)
    except Exception:  # a crashed node's view is only a hint for the restart
        pass
    return default


def _flow_tuple(flow_type: Any, rng: random.Random) -> Any:
    return flow_type(
        client=f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        client_port=rng.randrange(1024, 65536),
        vip="10.255.0.1",
        vip_port=80,
        proto=6,
    )


def run(config: SimConfig, node_factory: Callable[[NodeSpec], Any] | None = None) -> dict[str, Any]:
    return Sim(config, node_factory).run().report()

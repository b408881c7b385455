"""One cluster member's protocol engine: SWIM with the Lifeguard refinements, sans-IO.

The owner feeds it datagrams (``handle_datagram``) and time (``tick`` at
``next_deadline()``), and drains ``take_outgoing()`` / ``take_events()``. It owns no
socket, no clock and no global randomness, so a test or the simulator can run many
members in one process, deterministically.

What happens, per member:

* every probe interval (scaled by local health awareness) it pings the next member of
  a shuffled round-robin list; a ping to a suspect carries the suspicion (buddy rule)
  so the member can refute at once; no ack within the probe timeout -> ping-req
  through ``indirect_checks`` helpers, who ack on its behalf or nack; no ack by the
  end of the interval -> suspect, gossiped with the incarnation we know;
* suspicions run a Lifeguard timer (suspicion.py) shrunk by independent
  confirmations; expiry -> dead, gossiped; dead and left members are reaped later;
* every update rides on outgoing datagrams through the transmit-limited broadcast
  queue (broadcasts.py) and on gossip rounds to ``gossip_nodes`` random members;
* fresh news (and fresh evictions above all) is forwarded after a few ms of batching
  rather than at the next gossip round, so an epidemic hop costs a LAN round trip;
* push-pull with one random member exchanges full member state and an eviction
  digest, which is how missed updates and missed evictions are repaired; while
  evictions flow, the digest alone also goes to a random member every few seconds;
* evictions are numbered per origin, sent to the multicast group at once (if any)
  and gossiped; receipt is idempotent (evictions.py);
* a member we hold dead that talks to us is told so directly (it refutes at once), and
  a sender we do not know at all means a hole in our view, repaired by a state pull.

Reflection: a datagram is only ever sent to a known member's address, a configured
peer, or the authenticated source of a join.
"""
from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import msgpack

from .awareness import Awareness
from .broadcasts import BroadcastQueue
from .evictions import EvictionTracker, Receipt
from .health_view import usable_backends as _usable_backends
from .membership import MemberState, MemberTable, MemberView, Verdict
from .messages import (
    FLOW_RECORD_SIZE, MAX_RUN, MAX_U64, PROTOCOL_VERSION, RUNS_VERSION, Ack, Alive, Dead, DigestEntry,
    Eviction, EvictionDigest, EvictionRun, FlowTuple, Left,
    MemberMeta, MemberRecord, Nack, Ping, PingReq, PushPull, Status, Suspect, canonical_ip, decode,
    decode_eviction, decode_eviction_run, encode, encode_meta, flow_tuple_of, valid_records,
)
from .messages import T_ALIVE as M_ALIVE
from .messages import T_EVICT as M_EVICT
from .messages import T_EVICTS as M_EVICTS
from .protocol_config import ProtocolConfig, push_pull_scale, retransmit_limit, suspicion_bounds
from .suspicion import Suspicion

__all__ = [
    "Node", "GROUP", "Outgoing", "FlowTuple", "MemberMeta", "Status", "MemberView", "PROTOCOL_VERSION",
    "MemberUp", "MemberSuspect", "MemberDead", "MemberLeft", "MetaChanged", "EvictionReceived", "EvictionsReceived", "Event",
]


class _Group:
    """Destination meaning "the multicast/broadcast group, if the transport has one"."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "GROUP"

    def __reduce__(self) -> str:
        return "GROUP"


GROUP = _Group()


@dataclass(frozen=True)
class Outgoing:
    dest: Union[tuple[str, int], _Group]
    data: bytes


@dataclass(frozen=True)
class MemberUp:
    """A member is new, came back (rejoin) or refuted a suspicion: it is ALIVE now."""
    member: MemberView


@dataclass(frozen=True)
class MemberSuspect:
    member: MemberView


@dataclass(frozen=True)
class MemberDead:
    member: MemberView


@dataclass(frozen=True)
class MemberLeft:
    member: MemberView


@dataclass(frozen=True)
class MetaChanged:
    member: MemberView


class EvictionReceived(NamedTuple):
    tuple: FlowTuple
    origin: str
    seq: int


class EvictionsReceived(NamedTuple):
    """Evictions of a run (:class:`EvictionRun`) new to this member: each a flow record,
    byte for byte the data plane's key of the flow (:func:`flow_tuple_of` reads one)."""
    origin: str
    seqs: tuple[int, ...]
    records: tuple[bytes, ...]

    def tuples(self) -> list[FlowTuple]:
        return [flow_tuple_of(r) for r in self.records]


Event = Union[MemberUp, MemberSuspect, MemberDead, MemberLeft, MetaChanged, EvictionReceived, EvictionsReceived]

_INF = float("inf")
_tuple_new = tuple.__new__  # skips NamedTuple's generated __new__
_SEQ_MASK = (1 << 32) - 1


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    start: float
    timeout_at: float
    end_at: float
    indirect: bool = False
    helpers: tuple[str, ...] = ()
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: str
    requester_addr: tuple[str, int]
    their_seq: int
    target: str
    nack: bool


def _member_key(name: str) -> Hashable:
    return ("m", name)


def _is_eviction_key(key: Hashable) -> bool:
    return type(key) is tuple and key[0] == "e"


class Node:
    def __init__(self, *, name: str, address: tuple[str, int], wire: Any, config: ProtocolConfig,
                 rng: random.Random, now: float, meta: MemberMeta | None = None, incarnation: int = 0,
                 peers: Sequence[tuple[str, int]] = (), group: bool = False) -> None:
        if not name or not name.isprintable() or len(name) > 128:
            raise ValueError("name must be 1..128 printable characters")
        self.name = name
        self.address = (str(ipaddress.ip_address(address[0])), int(address[1]))
        self.wire = wire
        self.config = config
        self.rng = rng
        self._group = bool(group)
        # Sorted for iteration (str hashing differs between processes, and a simulator
        # run must be reproducible), a set for lookups.
        self._peer_list: tuple[tuple[str, int], ...] = tuple(sorted(
            {(str(ipaddress.ip_address(h)), int(p)) for h, p in peers}))
        self._peers: frozenset[tuple[str, int]] = frozenset(self._peer_list)
        meta = meta if meta is not None else MemberMeta()
        local = MemberState(name, self.address, Status.ALIVE, int(incarnation), 0, meta, now)
        self.table = MemberTable(local, self._new_suspicion)
        self.awareness = Awareness(config.awareness_max_multiplier)
        self._bq = BroadcastQueue(config.broadcast_queue_max)
        self._ev = EvictionTracker(
            buffer_max=config.eviction_buffer_max, buffer_ttl=config.eviction_buffer_ttl,
            gap_timeout=config.eviction_gap_timeout, digest_recent=config.eviction_digest_recent,
            repair_max=config.eviction_repair_max, origins_max=config.eviction_origins_max)
        self._epoch = int(incarnation)
        self._ev_seq = 0
        self._run_cap: int | None = None  # flow records per run (_run_capacity)
        # own evictions not yet in any datagram, oldest first (see evictions_sent_through)
        self._ev_unsent: deque[int] = deque()
        self._group_pending: list[bytes] = []
        self._counters: Counter[str] = Counter()
        self._out: list[Outgoing] = []
        self._events: list[Event] = []
        self._seq = rng.getrandbits(32)

        pi = config.probe_interval
        # Random phases so that members started together do not probe and gossip in step.
        self._next_probe = now + rng.uniform(0, pi)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        # The next push-pull is at _pp_base + _pp_frac * (interval scaled to the current
        # N): re-evaluated as the cluster grows, so members that joined a small cluster
        # do not keep the small cluster's short interval (and all fire at once).
        self._pp_base = now
        self._pp_frac = rng.uniform(0.1, 1.0)
        self._next_push_pull = now + self._pp_frac * config.push_pull_interval
        self._last_gossip = -_INF
        self._next_join = _INF
        self._next_ev_sync = now + rng.uniform(0.5, 1.0) * config.eviction_sync_interval
        self._next_reconnect = now + rng.uniform(0.5, 1.0) * config.reconnect_interval
        self._source: tuple[str, int] | None = None  # of the datagram being handled
        self._joined = False
        self._probe: _Probe | None = None
        self._probe_list: list[str] = []
        self._probe_pos = 0
        self._relays: dict[int, _Relay] = {}
        self._relay_heap: list[tuple[float, int]] = []
        self._susp_heap: list[tuple[float, str, int]] = []
        self._reap_heap: list[tuple[float, str, float]] = []
        self._join_sources: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._pp_seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._health_cache: list[str] | None = None
        self._left = False
        self._unknown: dict[str, float] = {}  # unknown sender -> first heard
        self._last_repair_pull = -_INF
        self._awaiting_baseline = False

    # ---- public API ------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self.table.local.incarnation

    @property
    def joined(self) -> bool:
        return self._joined

    @property
    def stats(self) -> Counter[str]:
        """Counters; drops are "drop.<reason>", including the Wire's."""
        out = Counter(self._counters)
        for reason, n in getattr(self.wire, "drops", {}).items():
            out["drop." + str(getattr(reason, "value", reason))] += n
        out["members"] = len(self.table)
        out["members_live"] = self.table.live_count()
        out["broadcast_queue"] = len(self._bq)
        out["eviction_buffer"] = self._ev.buffered
        out["awareness"] = self.awareness.score
        out["incarnation"] = self.incarnation
        return out

    def join(self, now: float) -> None:
        if not self._peers - {self.address} and not self._group:
            self._joined = True  # nobody to contact: a cluster of one
            return
        self._joined = False
        self._awaiting_baseline = True
        self._next_join = now
        # We announce ourselves too: the seed's gossip alone is a single source with a
        # small retransmit budget, and members that joined after the seed's reply
        # learn about us only through gossip.
        self._broadcast_self(now)
        self._send_join(now)

    def leave(self, now: float) -> None:
        if self._left:
            return
        self._left = True
        self.table.leaving = True
        local = self.table.local
        local.incarnation += 1
        local.status = Status.LEFT
        local.status_since = now
        self._next_join = _INF
        self._probe = None
        msg = Left(self.name, local.incarnation)
        enc = self._enc(msg)
        self._bq.queue(_member_key(self.name), enc, self.config.retransmit_mult)
        # Flush: tell a few members directly (and the group) rather than waiting for
        # gossip rounds the agent may not stay around for.
        n = retransmit_limit(self.config.retransmit_mult, self.table.live_count())
        for name in self.table.random_live(self.rng, n):
            m = self.table.get(name)
            if m is not None:
                self._send(m.address, [enc], now, piggyback=False)
        if self._group:
            self._send(GROUP, [enc], now, piggyback=False)
        self._health_cache = None

    def handle_datagram(self, now: float, data: bytes, source: tuple[str, int]) -> None:
        c = self._counters
        c["datagrams_received"] += 1
        c["bytes_received"] += len(data)
        opened = self.wire.open(now, data, source)
        messages = getattr(opened, "messages", None)
        if messages is None:
            return  # counted by the Wire
        sender = opened.sender
        m = self.table.get(sender)
        if m is None:
            if sender not in self._unknown and len(self._unknown) < 64:
                self._unknown[sender] = now
        elif m.status in (Status.DEAD, Status.LEFT):
            self._tell_dead(now, m, source)
        table = self.table
        for raw in messages:
            # Fast path for the bulk of gossip: an alive we already have (every member
            # hears each update ~log N times). It would be ignored whatever its other
            # fields hold, so it is dropped before full validation; only such
            # already-superseded messages skip the malformed count.
            if type(raw) is list and len(raw) == 7 and type(raw[0]) is int and raw[0] == M_ALIVE:
                name, inc = raw[1], raw[4]
                if type(name) is str and type(inc) is int and name != self.name:
                    known = table.get(name)
                    if known is not None and inc <= known.incarnation:
                        c["alive_superseded"] += 1
                        continue
            if type(raw) is list and raw and type(raw[0]) is int:
                # the bulk under load (runs, single evictions): straight to their
                # handlers, which need no source
                fast = _EVICTION_PATHS.get((raw[0], len(raw)))
                if fast is not None:
                    msg = fast[0](raw)
                    if msg is None:
                        c["drop.malformed"] += 1
                    else:
                        fast[1](self, now, msg)
                    continue
            if isinstance(raw, (bytes, bytearray)):
                try:
                    raw = msgpack.unpackb(raw, raw=False)
                except Exception:  # noqa: BLE001 -- hostile input must not raise
                    raw = None
            msg = decode(raw)
            if msg is None:
                c["drop.malformed"] += 1
                continue
            self._source = source
            try:
                self._dispatch(now, msg, sender, source)
            finally:
                self._source = None

    def tick(self, now: float) -> None:
        if self._next_join <= now:
            self._send_join(now)
        self._run_suspicion_timers(now)
        self._run_relay_timers(now)
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.timeout_at:
                self._send_indirect(p, now)
            if now >= p.end_at:
                self._finish_probe(p, now)
        if now >= self._next_probe:
            self._maintain(now)
            if not self._left:
                self._start_probe(now)
            self._next_probe = now + self.awareness.scale(self.config.probe_interval)
        if now >= self._next_gossip:
            self._gossip(now)
        if now >= self._next_reconnect:
            self._next_reconnect = now + self.config.reconnect_interval
            if self._joined and not self._left:
                self._reconnect(now)
        if now >= self._next_ev_sync:
            self._next_ev_sync = now + self.config.eviction_sync_interval
            if not self._left:
                self._eviction_sync(now)
        if now >= self._next_push_pull:
            if not self._left:
                self._push_pull(now)
            self._pp_base = now
            self._pp_frac = 1.0
            self._reschedule_push_pull()

    def next_deadline(self) -> float:
        d = min(self._next_probe, self._next_push_pull, self._next_join, self._next_ev_sync,
                self._next_reconnect)
        if len(self._bq):
            d = min(d, self._next_gossip)
        p = self._probe
        if p is not None:
            d = min(d, p.end_at if p.indirect else p.timeout_at)
        if self._susp_heap:
            d = min(d, self._susp_heap[0][0])
        if self._relay_heap:
            d = min(d, self._relay_heap[0][0])
        return d

    def take_outgoing(self) -> list[Outgoing]:
        if self._group_pending:
            self._flush_group()
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def publish_eviction(self, key: FlowTuple, now: float) -> int:
        """Queue an eviction of ``key`` for every member; returns its number."""
        if key.proto not in (6, 17):
            raise ValueError("proto must be 6 (TCP) or 17 (UDP)")
        if not (0 <= key.client_port <= 65535 and 0 <= key.vip_port <= 65535):
            raise ValueError("ports must be in 0..65535")
        canonical = _tuple_new(FlowTuple, (canonical_ip(key.client), key.client_port,
                                           canonical_ip(key.vip), key.vip_port, key.proto))
        self._ev_seq += 1
        ev = _tuple_new(Eviction, (self.name, self._epoch, self._ev_seq, canonical))
        self._ev.receive(ev, now)
        enc = self._enc(ev)
        self._counters["evictions_sent"] += 1
        self._to_group(enc)
        self._queue_eviction(ev, enc, now)
        self._ev_unsent.append(self._ev_seq)
        if len(self._ev_unsent) > self.config.broadcast_queue_max:
            self._prune_unsent()  # nobody asks (a simulator, a bench): stay bounded
        return self._ev_seq

    def publish_evictions(self, keys: Iterable[FlowTuple], now: float) -> int:
        """:meth:`publish_eviction` for each of ``keys``; one the node refuses (not
        TCP/UDP, a port out of range, not an address) is counted and skipped, so one
        bad record cannot drop the batch it came in. Returns the number of the last
        eviction published (0: none)."""
        seq = 0
        for key in keys:
            try:
                seq = self.publish_eviction(key, now)
            except ValueError:
                self._counters["evictions_refused"] += 1
        return seq

    def publish_eviction_records(self, records: Iterable[bytes], now: float) -> int:
        """Queue evictions of flows given as flow records (:func:`flow_record`, the data
        plane's keys), in runs of up to :data:`MAX_RUN` per message while every live
        member takes runs, one message each otherwise. A record that is not one is
        counted and skipped. Returns the number of the last eviction published (0: none)."""
        good = []
        for r in records:
            if type(r) is bytes and len(r) == FLOW_RECORD_SIZE and valid_records(r):
                good.append(r)
            else:
                self._counters["evictions_refused"] += 1
        if not good:
            return 0
        per_run = self._run_capacity() if self._runs_welcome() else 0
        if per_run < 2:
            return self.publish_evictions([flow_tuple_of(r) for r in good], now)
        c = self._counters
        name, epoch = self.name, self._epoch
        for i in range(0, len(good), per_run):
            chunk = good[i:i + per_run]
            first = self._ev_seq + 1
            self._ev_seq += len(chunk)
            self._ev.receive_run(name, epoch, first, chunk, now)
            enc = self._enc(_tuple_new(EvictionRun, (name, epoch, first, b"".join(chunk))))
            c["evictions_sent"] += len(chunk)
            c["eviction_runs_sent"] += 1
            self._to_group(enc)
            # keyed by its first eviction, as a single one would be: evictions_sent_through
            # looks for the first unsent one's key
            self._bq.queue(("e", name, epoch, first), enc, self.config.eviction_retransmit_mult)
            self._ev_unsent.append(first)
        self._expedite(now, self.config.eviction_batch_delay)
        if len(self._ev_unsent) > self.config.broadcast_queue_max:
            self._prune_unsent()
        return self._ev_seq

    def _to_group(self, enc: bytes) -> None:
        # evictions go to the multicast group at once, where there is one
        if self._group:
            self._group_pending.append(enc)
            if len(self._group_pending) > self.config.eviction_buffer_max:
                # The owner is not draining take_outgoing(); gossip still carries these.
                del self._group_pending[0]
                self._counters["group_evictions_dropped"] += 1

    def _runs_welcome(self) -> bool:
        """Every live member takes runs of evictions (an older one would drop them)."""
        t = self.table
        for n in t.live_names():
            m = t.get(n)
            if m is not None and m.meta.version < RUNS_VERSION:
                return False
        return True

    def _run_capacity(self) -> int:
        """Flow records per run that fit in one datagram with any seq."""
        if self._run_cap is None:
            empty = len(self._enc(EvictionRun(self.name, self._epoch, MAX_U64, b"")))
            # 2 to spare: past 255 bytes of records their bin header is one byte longer
            self._run_cap = max(0, min(MAX_RUN, (self.wire.capacity - empty - 2) // FLOW_RECORD_SIZE))
        return self._run_cap

    def evictions_sent_through(self) -> int:
        """The number of this member's own evictions up to which every one has gone
        out in at least one datagram, or will never go (dropped from a full queue),
        or has nobody to go to (a joined member alone). A reader of socket closes
        keeps each close it acted on until this passes the eviction it published, so
        a close is never lost with a process killed before telling its peers."""
        q = self._ev_unsent
        if self._joined and self.table.live_count() <= 1:
            q.clear()
        self._prune_unsent()
        return q[0] - 1 if q else self._ev_seq

    def _prune_unsent(self) -> None:
        # an item gone from the queue went out as often as it should, or was dropped
        q, bq, name, epoch = self._ev_unsent, self._bq, self.name, self._epoch
        while q and bq.transmits(("e", name, epoch, q[0])) != 0:
            q.popleft()

    def eviction_marks(self) -> list[DigestEntry]:
        """Per other origin, the eviction number up to which every eviction was seen.
        An agent saves these beside its conntrack state and hands them to
        :meth:`restore_eviction_marks` after a restart."""
        return [e for e in self._ev.marks() if e.origin != self.name]

    def restore_eviction_marks(self, entries: list[DigestEntry] | tuple[DigestEntry, ...], now: float) -> None:
        """Before :meth:`join`: resume eviction numbering where the previous run of this
        member stopped, so the join asks for exactly the evictions published while it
        was down (instead of taking the seed's marks and missing them)."""
        n = self._ev.restore([e for e in entries if e.origin != self.name], now)
        self._counters["eviction_marks_restored"] += n

    def update_meta(self, meta: MemberMeta, now: float) -> None:
        local = self.table.local
        alive = Alive(self.name, self.address, local.incarnation + 1, local.meta_version + 1, meta)
        if len(self._enc(alive)) > self.wire.capacity:
            raise ValueError("meta too large to gossip in one datagram; report only failed observations")
        local.incarnation += 1
        local.meta_version += 1
        local.meta = meta
        self._health_cache = None
        self._broadcast_self(now)
        self._events.append(MetaChanged(local.view()))

    def members(self) -> list[MemberView]:
        return [m.view() for m in self.table]

    def usable_backends(self) -> list[str]:
        if self._health_cache is None:
            self._health_cache = _usable_backends(self.members())
        return list(self._health_cache)

    # ---- sending ---------------------------------------------------------------------

    def _enc(self, msg: Any) -> bytes:
        return self.wire.encode(encode(msg))

    def _allowed(self, dest: Any) -> bool:
        if dest is GROUP:
            return self._group
        return (self.table.name_at(dest) is not None or dest in self._peers or dest in self._join_sources)

    def _send(self, dest: Any, primary: list[bytes], now: float, piggyback: bool = True) -> bool:
        if not self._allowed(dest):
            self._counters["send_refused"] += 1
            return False
        msgs = list(primary)
        if piggyback:
            used = sum(len(m) for m in msgs)
            cap = self.wire.capacity
            if used < cap:
                msgs.extend(self._bq.take(cap - used, 0, self.table.live_count()))
        if not msgs:
            return False
        try:
            datagrams = self.wire.seal(msgs)
        except ValueError:
            self._counters["send_oversized"] += 1
            return False
        c = self._counters
        for d in datagrams:
            self._out.append(Outgoing(dest, d))
            c["datagrams_sent"] += 1
            c["bytes_sent"] += len(d)
        return True

    def _flush_group(self) -> None:
        pending, self._group_pending = self._group_pending, []
        for d in self.wire.seal(pending):
            self._out.append(Outgoing(GROUP, d))
            self._counters["datagrams_sent"] += 1
            self._counters["bytes_sent"] += len(d)
            self._counters["group_datagrams_sent"] += 1

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _broadcast(self, name: str, msg: Any, now: float) -> None:
        self._bq.queue(_member_key(name), self._enc(msg), self.config.retransmit_mult)
        self._expedite(now, self.config.update_batch_delay)

    def _expedite(self, now: float, delay: float) -> None:
        # Fresh news goes out after a short batching delay instead of waiting for the
        # next gossip round, so each epidemic hop costs milliseconds, not ~100 ms.
        # Expedited rounds are still spaced by a quarter interval, which bounds the
        # datagram rate during mass churn.
        due = max(now + delay, self._last_gossip + self.config.gossip_interval / 4)
        if due < self._next_gossip:
            self._next_gossip = due

    def _self_alive(self) -> Alive:
        local = self.table.local
        return Alive(self.name, self.address, local.incarnation, local.meta_version, local.meta)

    def _broadcast_self(self, now: float) -> None:
        self._broadcast(self.name, self._self_alive(), now)

    # ---- dispatch --------------------------------------------------------------------

    def _dispatch(self, now: float, msg: Any, sender: str, source: tuple[str, int]) -> None:
        t = type(msg)
        if t is Eviction:
            self._on_eviction(now, msg)
        elif t is EvictionRun:
            self._on_eviction_run(now, msg)
        elif t is Ping:
            self._on_ping(now, msg, sender, source)
        elif t is Ack:
            self._on_ack(now, msg, sender)
        elif t is Alive:
            self._on_alive(now, msg)
        elif t is Suspect:
            self._on_suspect(now, msg)
        elif t is Dead:
            self._on_dead(now, msg)
        elif t is Left:
            self._on_left(now, msg)
        elif t is PingReq:
            self._on_ping_req(now, msg, sender, source)
        elif t is Nack:
            self._on_nack(msg, sender)
        elif t is PushPull:
            self._on_push_pull(now, msg, sender, source)
        elif t is EvictionDigest:
            self._on_digest(now, msg, sender, source)

    def _tell_dead(self, now: float, m: MemberState, source: tuple[str, int]) -> None:
        # A member we hold dead (or gone) is talking to us: a false positive, a forged
        # claim, or a restart. Tell it directly so it refutes now, not at the next
        # push-pull. A member really leaving ignores this.
        if self._allowed(source):
            self._counters["dead_notified"] += 1
            msg = (Dead(m.name, m.incarnation, self.name) if m.status is Status.DEAD
                   else Left(m.name, m.incarnation))
            self._send(source, [self._enc(msg)], now, piggyback=False)

    def _reply_dest(self, sender: str, source: tuple[str, int]) -> tuple[str, int] | None:
        if self._allowed(source):
            return source
        m = self.table.get(sender)
        if m is not None and m.status in (Status.ALIVE, Status.SUSPECT):
            return m.address
        self._counters["reply_refused"] += 1
        return None

    # ---- probing ---------------------------------------------------------------------

    def _on_ping(self, now: float, msg: Ping, sender: str, source: tuple[str, int]) -> None:
        if msg.target != self.name:
            self._counters["ping_misdirected"] += 1
            return
        dest = self._reply_dest(sender, source)
        if dest is not None:
            self._send(dest, [self._enc(Ack(msg.seq))], now)

    def _on_ack(self, now: float, msg: Ack, sender: str) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq and (sender == p.target or sender in p.helpers):
            self._probe = None
            self._counters["probe_acks"] += 1
            if sender != p.target:
                self._counters["probe_acks_indirect"] += 1
            self.awareness.apply(-1)
            return
        r = self._relays.get(msg.seq)
        if r is not None and sender == r.target:
            del self._relays[msg.seq]
            self._send(r.requester_addr, [self._enc(Ack(r.their_seq))], now)
            self._counters["pingreq_acked"] += 1

    def _on_nack(self, msg: Nack, sender: str) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq and sender in p.helpers:
            p.nacks += 1

    def _on_ping_req(self, now: float, msg: PingReq, sender: str, source: tuple[str, int]) -> None:
        requester = self.table.get(sender)
        target = self.table.get(msg.target)
        if (requester is None or target is None or msg.target == self.name
                or target.status not in (Status.ALIVE, Status.SUSPECT)):
            self._counters["pingreq_refused"] += 1
            return
        if len(self._relays) >= self.config.pending_probes_max:
            self._counters["pingreq_overflow"] += 1
            return
        dest = self._reply_dest(sender, source)
        if dest is None:
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(sender, dest, msg.seq, msg.target, msg.nack)
        # Nack a little before a full probe timeout: the requester sent this after its
        # own probe timeout and judges at the end of its probe interval, so a nack sent
        # after a full timeout would always arrive too late to count.
        heapq.heappush(self._relay_heap, (now + 0.8 * self.config.probe_timeout, seq))
        self._counters["pingreq_relayed"] += 1
        self._send(target.address, [self._enc(Ping(seq, msg.target))], now)

    def _run_relay_timers(self, now: float) -> None:
        heap = self._relay_heap
        while heap and heap[0][0] <= now:
            _, seq = heapq.heappop(heap)
            r = self._relays.pop(seq, None)
            if r is not None and r.nack:
                self._send(r.requester_addr, [self._enc(Nack(r.their_seq))], now)
                self._counters["nacks_sent"] += 1

    def _next_target(self) -> MemberState | None:
        # Randomized round-robin: every member is probed once per round, in a fresh
        # random order each round, which bounds the time to first detection.
        for _ in range(2):
            lst = self._probe_list
            while self._probe_pos < len(lst):
                name = lst[self._probe_pos]
                self._probe_pos += 1
                m = self.table.get(name)
                if m is not None and m.status in (Status.ALIVE, Status.SUSPECT):
                    return m
            self._probe_list = self.table.live_names()
            self.rng.shuffle(self._probe_list)
            self._probe_pos = 0
        return None

    def _start_probe(self, now: float) -> None:
        if self._probe is not None:
            self._finish_probe(self._probe, now)
        m = self._next_target()
        if m is None:
            return
        seq = self._next_seq()
        primary = []
        if m.status is Status.SUSPECT:
            # Buddy rule: the suspect learns of the suspicion from this very ping.
            primary.append(self._enc(Suspect(m.name, m.incarnation, self.name)))
        primary.append(self._enc(Ping(seq, m.name)))
        self._counters["probes"] += 1
        self._probe = _Probe(seq, m.name, now,
                             now + self.awareness.scale(self.config.probe_timeout),
                             now + self.awareness.scale(self.config.probe_interval))
        self._send(m.address, primary, now)

    def _send_indirect(self, p: _Probe, now: float) -> None:
        p.indirect = True
        helpers = self.table.random_live(self.rng, self.config.indirect_checks, exclude=(p.target,),
                                         alive_only=True)
        p.helpers = tuple(helpers)
        enc = self._enc(PingReq(p.seq, p.target, True))
        for h in helpers:
            m = self.table.get(h)
            if m is not None:
                self._send(m.address, [enc], now)
        self._counters["indirect_probes"] += len(helpers)

    def _finish_probe(self, p: _Probe, now: float) -> None:
        self._probe = None
        self._counters["probe_failures"] += 1
        # Lifeguard: helpers that did not even nack suggest *we* are the one in trouble.
        if p.helpers:
            self.awareness.apply(len(p.helpers) - p.nacks)
        else:
            self.awareness.apply(1)
        m = self.table.get(p.target)
        if m is None or m.status not in (Status.ALIVE, Status.SUSPECT):
            return
        self._on_suspect(now, Suspect(m.name, m.incarnation, self.name))

    # ---- membership updates ----------------------------------------------------------

    def _new_suspicion(self, name: str, incarnation: int, origin: str, now: float) -> Suspicion:
        n = self.table.live_count()
        k = int(self.config.suspicion_mult) - 2
        if n - 2 < k:
            k = 0
        lo, hi = suspicion_bounds(self.config.suspicion_mult, self.config.suspicion_max_timeout_mult, n,
                                  self.config.probe_interval)
        return Suspicion(origin=origin, incarnation=incarnation, start=now, k=k, min_timeout=lo,
                         max_timeout=hi)

    def _refute(self, claimed: int, now: float) -> None:
        self.table.refute(claimed)
        self._counters["refutations"] += 1
        self._broadcast_self(now)
        src = self._source
        if src is not None and self._allowed(src):
            # Whoever told us holds the wrong belief, and may be on the other side of a
            # healed partition where our gossip does not go yet: answer it directly,
            # with our eviction digest (we may have missed evictions while doubted).
            self._send(src, [self._enc(self._self_alive())], now, piggyback=False)
            self._send_digest(src, now)

    def _on_alive(self, now: float, a: Alive) -> None:
        v, meta_changed = self.table.apply_alive(a, now)
        if v is Verdict.IGNORED:
            return
        if v is Verdict.REFUTE:
            self._refute(a.incarnation, now)
            return
        self._health_cache = None
        self._broadcast(a.name, a, now)
        m = self.table.get(a.name)
        assert m is not None
        if v is Verdict.UPDATED:
            if meta_changed:
                self._events.append(MetaChanged(m.view()))
            return
        if v is Verdict.JOINED:
            self._counters["members_joined"] += 1
        else:
            # Back from suspicion or death: while we could not hear each other, each
            # side may have missed the other's evictions. Our digest makes it send
            # what we lack now rather than at some later anti-entropy round.
            self._send_digest(m.address, now)
        if v is not Verdict.RECOVERED:
            # A new (or returning) member goes to a random place among the members not
            # yet probed this round, rather than waiting for the next round (N probes).
            lst = self._probe_list
            lst.insert(self.rng.randint(self._probe_pos, len(lst)), a.name)
        self._events.append(MemberUp(m.view()))

    def _on_suspect(self, now: float, s: Suspect) -> None:
        v = self.table.apply_suspect(s, now)
        if v is Verdict.IGNORED:
            return
        if v is Verdict.REFUTE:
            # Lifeguard: having to defend ourselves hints that we are slow to answer.
            self.awareness.apply(1)
            self._refute(s.incarnation, now)
            return
        m = self.table.get(s.name)
        assert m is not None and m.suspicion is not None
        self._broadcast(s.name, s, now)
        heapq.heappush(self._susp_heap, (m.suspicion.deadline, s.name, s.incarnation))
        if v is Verdict.SUSPECTED:
            self._counters["suspicions"] += 1
            self._health_cache = None
            self._events.append(MemberSuspect(m.view()))
        else:
            self._counters["suspicion_confirmations"] += 1

    def _run_suspicion_timers(self, now: float) -> None:
        heap = self._susp_heap
        while heap and heap[0][0] <= now:
            _, name, inc = heapq.heappop(heap)
            m = self.table.get(name)
            if (m is None or m.status is not Status.SUSPECT or m.incarnation != inc
                    or m.suspicion is None or m.suspicion.deadline > now):
                continue
            self._on_dead(now, Dead(name, inc, self.name))

    def _on_dead(self, now: float, d: Dead) -> None:
        v = self.table.apply_dead(d, now)
        if v is Verdict.IGNORED:
            return
        if v is Verdict.REFUTE:
            self._refute(d.incarnation, now)
            return
        m = self.table.get(d.name)
        assert m is not None
        self._broadcast(d.name, d, now)
        self._counters["deaths"] += 1
        self._health_cache = None
        heapq.heappush(self._reap_heap, (now + self.config.dead_reap_interval, d.name, now))
        self._events.append(MemberDead(m.view()))

    def _on_left(self, now: float, lv: Left) -> None:
        v = self.table.apply_left(lv, now)
        if v is Verdict.IGNORED:
            return
        if v is Verdict.REFUTE:
            self._refute(lv.incarnation, now)
            return
        m = self.table.get(lv.name)
        assert m is not None
        self._broadcast(lv.name, lv, now)
        self._counters["leaves"] += 1
        self._health_cache = None
        heapq.heappush(self._reap_heap, (now + self.config.dead_reap_interval, lv.name, now))
        self._events.append(MemberLeft(m.view()))

    def _merge_record(self, now: float, r: MemberRecord) -> None:
        st = r.status
        if st is Status.ALIVE:
            self._on_alive(now, Alive(r.name, r.address, r.incarnation, r.meta_version, r.meta))
        elif st is Status.SUSPECT:
            if r.name != self.name and self.table.get(r.name) is None:
                # Learn the member first: it is one, someone merely doubts it.
                self._on_alive(now, Alive(r.name, r.address, r.incarnation, r.meta_version, r.meta))
            self._on_suspect(now, Suspect(r.name, r.incarnation, self.name))
        elif st is Status.DEAD:
            self._on_dead(now, Dead(r.name, r.incarnation, self.name))
        else:
            self._on_left(now, Left(r.name, r.incarnation))

    # ---- maintenance -----------------------------------------------------------------

    def _check_unknown_senders(self, now: float) -> None:
        grace = self.config.unknown_sender_grace
        overdue = False
        for name, since in list(self._unknown.items()):
            if self.table.get(name) is not None:
                del self._unknown[name]
            elif now - since >= grace:
                overdue = True
        if overdue and self._joined and not self._left and now - self._last_repair_pull >= grace:
            self._last_repair_pull = now
            self._unknown.clear()
            self._counters["view_repair_pulls"] += 1
            self._push_pull(now)

    def _reschedule_push_pull(self) -> None:
        self._next_push_pull = self._pp_base + self._pp_frac * push_pull_scale(
            self.config.push_pull_interval, self.table.live_count())

    def _maintain(self, now: float) -> None:
        self._reschedule_push_pull()
        if self._unknown:
            self._check_unknown_senders(now)
        heap = self._reap_heap
        while heap and heap[0][0] <= now:
            _, name, since = heapq.heappop(heap)
            m = self.table.get(name)
            if m is None or m.status not in (Status.DEAD, Status.LEFT) or m.status_since != since:
                continue
            self.table.remove(name)
            self._bq.discard(_member_key(name))
            forget = getattr(self.wire, "forget_sender", None)
            if forget is not None:
                forget(name)
            self._counters["members_reaped"] += 1
        self._ev.expire(now)
        js = self._join_sources
        while js and next(iter(js.values())) <= now:
            js.popitem(last=False)

    # ---- gossip ----------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        self._next_gossip = now + self.config.gossip_interval
        if not len(self._bq):
            return
        self._last_gossip = now
        n = self.table.live_count()
        cap = self.wire.capacity
        # A burst (thousands of evictions a second when a busy service's connections
        # close) needs more than one datagram per target and round, or the queue
        # overflows and drops; quiet rounds still send one.
        targets = self.table.random_live(self.rng, self.config.gossip_nodes)
        if targets and len(targets) >= n - 1:
            self._gossip_to_all(targets, now)
            return
        for name in targets:
            m = self.table.get(name)
            if m is None:
                continue
            sent: set = set()
            for _ in range(self.config.gossip_max_datagrams):
                msgs = self._bq.take(cap, 0, n, taken=sent)
                if not msgs:
                    break
                self._send(m.address, msgs, now, piggyback=False)
                self._counters["gossip_datagrams"] += 1
            if not len(self._bq):
                break

    def _gossip_to_all(self, targets: list[str], now: float) -> None:
        """A round that reaches every member: the same datagrams go to each, so every
        update taken reaches all of them (a burst larger than one round's datagrams
        would otherwise reach each member with other updates, and the ones dropped
        from a full queue would miss some members), and receivers need not relay."""
        known = [m.address for m in (self.table.get(name) for name in targets) if m is not None]
        addrs = [a for a in known if self._allowed(a)]
        c = self._counters
        c["send_refused"] += len(known) - len(addrs)
        if not addrs:
            return
        n = self.table.live_count()
        cap = self.wire.capacity
        # An eviction in such a round has reached every member: a second round of it
        # would only be a duplicate that each of them decrypts, decodes and drops
        # (thousands a second under connection-per-request load). A copy lost on the
        # way is what the eviction digest repairs.
        final = _is_eviction_key if self.config.eviction_once_to_all else None
        for _ in range(self.config.gossip_max_datagrams):
            msgs = self._bq.take(cap, 0, n, copies=len(addrs), final=final)
            if not msgs:
                break
            # Sealed once for all of them: nothing in a datagram names its receiver,
            # and each receiver's replay window sees the sender's seq once.
            try:
                datagrams = self.wire.seal(msgs)
            except ValueError:
                c["send_oversized"] += 1
                continue
            for a in addrs:
                for d in datagrams:
                    self._out.append(Outgoing(a, d))
                    c["datagrams_sent"] += 1
                    c["bytes_sent"] += len(d)
                c["gossip_datagrams"] += 1

    # ---- evictions -------------------------------------------------------------------

    def _queue_eviction(self, ev: Eviction, enc: bytes, now: float) -> None:
        self._bq.queue(("e", ev.origin, ev.epoch, ev.seq), enc, self.config.eviction_retransmit_mult)
        self._expedite(now, self.config.eviction_batch_delay)

    def _on_eviction_run(self, now: float, run: EvictionRun) -> None:
        data = run.records
        records = [data[i:i + FLOW_RECORD_SIZE] for i in range(0, len(data), FLOW_RECORD_SIZE)]
        new = self._ev.receive_run(run.origin, run.epoch, run.first, records, now)
        c = self._counters
        if new is None:
            c["evictions_stale"] += len(records)
            return
        c["evictions_duplicate"] += len(records) - len(new)
        if not new:
            return
        c["evictions_received"] += len(new)
        first = run.first
        if len(new) == len(records):
            seqs = tuple(range(first, first + len(records)))
            got = tuple(records)
        else:
            seqs = tuple(first + i for i in new)
            got = tuple(records[i] for i in new)
        self._events.append(_tuple_new(EvictionsReceived, (run.origin, seqs, got)))
        if self.table.live_count() - 1 > self.config.gossip_nodes:
            if self._runs_welcome():
                self._bq.queue(("e", run.origin, run.epoch, first), self._enc(run),
                               self.config.eviction_retransmit_mult)
                self._expedite(now, self.config.eviction_batch_delay)
            else:
                # The origin did not know of an older member this one knows (it joined
                # since, or the news has not reached the origin): a run would be
                # dropped there as malformed, single evictions are read by every version.
                origin, epoch = run.origin, run.epoch
                for seq, rec in zip(seqs, got):
                    ev = _tuple_new(Eviction, (origin, epoch, seq, flow_tuple_of(rec)))
                    self._queue_eviction(ev, self._enc(ev), now)
                c["evictions_relayed_singly"] += len(got)
        else:
            c["evictions_not_relayed"] += len(new)

    def _on_eviction(self, now: float, ev: Eviction) -> None:
        r = self._ev.receive(ev, now)
        c = self._counters
        if r is Receipt.NEW:
            c["evictions_received"] += 1
            self._events.append(_tuple_new(EvictionReceived, (ev.tuple, ev.origin, ev.seq)))
            if self.table.live_count() - 1 > self.config.gossip_nodes:
                self._queue_eviction(ev, self._enc(ev), now)
            else:
                # Every gossip round of the origin reaches every member already, each
                # eviction several times; relaying would only multiply the datagrams
                # every member decrypts and drops as duplicates (a partial cut is
                # left to the digest repair).
                c["evictions_not_relayed"] += 1
        elif r is Receipt.DUPLICATE:
            c["evictions_duplicate"] += 1
        else:
            c["evictions_stale"] += 1

    # ---- push-pull and join ----------------------------------------------------------

    def _send_join(self, now: float) -> None:
        self._next_join = now + self.config.join_retry_interval
        for p in self._peer_list:
            if p != self.address:
                self._send_state(p, now, nonce=self._next_seq(), reply=False, join=True, group=False)
        if self._group:
            # Only our own record: whoever answers sends the full state.
            enc = self._enc(PushPull(self._next_seq(), False, True, True, 0, 1,
                                     (self.table.local.record(),)))
            self._send(GROUP, [enc], now, piggyback=False)
        self._counters["join_attempts"] += 1

    def _push_pull(self, now: float) -> None:
        names = self.table.random_live(self.rng, 1, alive_only=True)
        if not names:
            return
        m = self.table.get(names[0])
        if m is None:
            return
        self._counters["push_pulls"] += 1
        self._send_state(m.address, now, nonce=self._next_seq(), reply=False, join=False, group=False)

    def _state_chunks(self, nonce: int, reply: bool, join: bool) -> list[bytes]:
        cap = self.wire.capacity
        budget = cap - 48  # room for the chunk's own header fields
        encoded: list[tuple[MemberRecord, int]] = []
        for m in self.table:
            r = m.record()
            size = len(self.wire.encode(
                [r.name, r.address[0], r.address[1], 0, r.incarnation, r.meta_version, encode_meta(r.meta)]))
            if size > budget:
                self._counters["record_too_large"] += 1
                continue
            encoded.append((r, size))
        groups: list[list[MemberRecord]] = [[]]
        used = 0
        for r, size in encoded:
            if used + size > budget and groups[-1]:
                groups.append([])
                used = 0
            groups[-1].append(r)
            used += size
        count = len(groups)
        return [self._enc(PushPull(nonce, reply, join, False, i, count, tuple(g))) for i, g in enumerate(groups)]

    def _send_state(self, dest: tuple[str, int], now: float, *, nonce: int, reply: bool, join: bool,
                    group: bool) -> None:
        msgs = self._state_chunks(nonce, reply, join)
        entries = self._ev.digest(now)
        if not join or any(e.origin != self.name for e in entries):
            # A fresh joiner has seen no eviction; its empty digest would make the seed
            # send its whole buffer, so it takes the seed's marks from the reply instead.
            # A member that has marks (restored after a restart, or one reconnecting
            # after a partition) sends them and gets what it missed.
            msgs.extend(self._digest_messages(EvictionDigest(reply, tuple(entries))))
        self._send(dest, msgs, now, piggyback=False)

    def _digest_messages(self, digest: EvictionDigest) -> list[bytes]:
        cap = self.wire.capacity - 16
        out: list[bytes] = []
        batch: list[DigestEntry] = []
        used = 0
        for e in digest.entries:
            size = len(e.origin) + 12 + 9 * len(e.recent) + 20
            if batch and used + size > cap:
                out.append(self._enc(EvictionDigest(digest.reply, tuple(batch))))
                batch, used = [], 0
            batch.append(e)
            used += size
        if batch or not out:
            out.append(self._enc(EvictionDigest(digest.reply, tuple(batch))))
        return out

    def _on_push_pull(self, now: float, msg: PushPull, sender: str, source: tuple[str, int]) -> None:
        if msg.join:
            # The authenticated source of a join may be answered even before its own
            # record (possibly in another chunk) makes it a known member.
            self._join_sources[source] = now + 60.0
            self._join_sources.move_to_end(source)
            while len(self._join_sources) > 256:
                self._join_sources.popitem(last=False)
        for r in msg.records:
            self._merge_record(now, r)
        if not self._joined and (msg.reply or msg.join) and self._next_join != _INF:
            # A reply, or another member joining through us, means we are in a cluster.
            self._joined = True
            self._next_join = _INF
            # First anti-entropy at a random point of a full (size-scaled) interval:
            # members that joined together must not push-pull together.
            self._pp_base = now
            self._pp_frac = self.rng.uniform(0.1, 1.0)
            self._reschedule_push_pull()
        if msg.reply:
            return
        key = (sender, msg.nonce)
        if key in self._pp_seen:
            return
        self._pp_seen[key] = None
        while len(self._pp_seen) > 256:
            self._pp_seen.popitem(last=False)
        if msg.group:
            n = self.table.live_count()
            if self.rng.random() >= min(1.0, self.config.group_join_replies / max(1, n - 1)):
                return
        dest = self._reply_dest(sender, source)
        if dest is not None:
            self._send_state(dest, now, nonce=msg.nonce, reply=True, join=False, group=False)

    def _reconnect(self, now: float) -> None:
        dead = [m for m in self.table if m.status is Status.DEAD]
        if dead:
            # A bare ping is enough: if the member is up, one of us holds the other dead,
            # and any datagram from a member held dead makes the receiver tell it so;
            # the refutation goes straight back, and gossip spreads it on both sides.
            m = dead[self.rng.randrange(len(dead))]
            self._counters["reconnects"] += 1
            self._send(m.address, [self._enc(Ping(self._next_seq(), m.name))], now, piggyback=False)
            return
        lost = [p for p in self._peer_list if p != self.address and (
            (name := self.table.name_at(p)) is None
            or self.table.get(name).status not in (Status.ALIVE, Status.SUSPECT))]
        if lost:
            self._counters["reconnects"] += 1
            self._send_state(lost[self.rng.randrange(len(lost))], now, nonce=self._next_seq(), reply=False,
                             join=True, group=False)

    def _send_digest(self, dest: tuple[str, int], now: float) -> None:
        entries = self._ev.digest(now)
        if not entries:
            return
        self._counters["eviction_digests_on_rejoin"] += 1
        self._send(dest, self._digest_messages(EvictionDigest(False, tuple(entries))), now, piggyback=False)

    def _eviction_sync(self, now: float) -> None:
        entries = self._ev.digest(now)
        if not entries:
            return
        names = self.table.random_live(self.rng, 1, alive_only=True)
        m = self.table.get(names[0]) if names else None
        if m is None:
            return
        self._counters["eviction_syncs"] += 1
        self._send(m.address, self._digest_messages(EvictionDigest(False, tuple(entries))), now, piggyback=False)

    def _on_digest(self, now: float, msg: EvictionDigest, sender: str, source: tuple[str, int]) -> None:
        if msg.reply and self._awaiting_baseline:
            self._awaiting_baseline = False
            self._ev.adopt_baseline(msg.entries, now)
        missing = self._ev.missing(msg.entries)
        if not missing:
            return
        dest = self._reply_dest(sender, source)
        if dest is None:
            return
        self._counters["evictions_repair_sent"] += len(missing)
        self._send(dest, [self._enc(ev) for ev in missing], now, piggyback=False)


# (type code, length) of the eviction messages -> their decoder and handler
_EVICTION_PATHS = {
    (M_EVICTS, 5): (decode_eviction_run, Node._on_eviction_run),
    (M_EVICT, 9): (decode_eviction, Node._on_eviction),
}

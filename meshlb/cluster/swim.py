"""One cluster member's membership engine: SWIM with the Lifeguard refinements, sans-IO.

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
* fresh news is forwarded after a few ms of batching rather than at the next gossip
  round, so an epidemic hop costs a LAN round trip;
* push-pull with one random member exchanges full member state, which is how missed
  updates are repaired;
* a member we hold dead that talks to us is told so directly (it refutes at once), and
  a sender we do not know at all means a hole in our view, repaired by a state pull.

What else members tell each other rides on this through a delegate (delegate.py):
its messages, its part of a push-pull, its broadcasts on the same queue.

Reflection: a datagram is only ever sent to a known member's address, a configured
peer, or the authenticated source of a join.
"""
from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol

from .awareness import Awareness
from .broadcasts import BroadcastQueue
from .delegate import GROUP, Address, Delegate, Destination, EventT, Handler, NoDelegate
from .health_view import usable_backends as _usable_backends
from .membership import MemberState, MemberTable, MemberView, Verdict
from .messages import (
    Ack,
    Alive,
    Dead,
    Left,
    MemberMeta,
    MemberRecord,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
    decode_received,
    encode,
    encode_meta,
    peek_alive,
)
from .protocol_config import ProtocolConfig, push_pull_scale, retransmit_limit, suspicion_bounds
from .suspicion import Suspicion
from .wire import Drop, Opened

__all__ = [
    "SwimNode", "GossipWire", "GROUP", "Outgoing",
    "MemberUp", "MemberSuspect", "MemberDead", "MemberLeft", "MetaChanged", "MemberEvent",
]


class GossipWire(Protocol):
    """What the engine needs of a wire (wire.Wire): seal and open datagrams."""

    @property
    def capacity(self) -> int:
        """Bytes of encoded messages that fit in one datagram."""
        ...

    @property
    def drops(self) -> Mapping[Drop, int]:
        """Datagrams dropped, by reason."""
        ...

    def encode(self, message: Any) -> bytes: ...

    def seal(self, encoded: Sequence[bytes]) -> list[bytes]: ...

    def open(self, now: float, datagram: bytes, source: Address) -> Opened | Drop: ...

    def forget_sender(self, name: str) -> None:
        """The member was reaped: its replay window can go."""
        ...


@dataclass(frozen=True)
class Outgoing:
    dest: Destination
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


MemberEvent = MemberUp | MemberSuspect | MemberDead | MemberLeft | MetaChanged

_INF = float("inf")
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
    requester_addr: Address
    their_seq: int
    target: str
    nack: bool


# what the engine handles itself
_OWN_MESSAGES = frozenset((Ping, Ack, Nack, PingReq, Alive, Suspect, Dead, Left, PushPull))


def _member_key(name: str) -> Hashable:
    return ("m", name)


class SwimNode(Generic[EventT]):
    """The engine; ``EventT`` is the type of the delegate's events, delivered by
    ``take_events`` among the engine's own."""

    def __init__(self, *, name: str, address: Address, wire: GossipWire, config: ProtocolConfig,
                 rng: random.Random, now: float, meta: MemberMeta | None = None, incarnation: int = 0,
                 peers: Sequence[Address] = (), group: bool = False,
                 delegate: Delegate[EventT] | None = None) -> None:
        if not name or not name.isprintable() or len(name) > 128:
            raise ValueError("name must be 1..128 printable characters")
        self.name = name
        self.address = (str(ipaddress.ip_address(address[0])), int(address[1]))
        self.wire = wire
        self.config = config
        self.rng = rng
        self._group = bool(group)
        self._delegate: Delegate[EventT] = delegate if delegate is not None else NoDelegate()
        # Sorted for iteration (str hashing differs between processes, and a simulator
        # run must be reproducible), a set for lookups.
        self._peer_list: tuple[Address, ...] = tuple(sorted(
            {(str(ipaddress.ip_address(h)), int(p)) for h, p in peers}))
        self._peers: frozenset[Address] = frozenset(self._peer_list)
        meta = meta if meta is not None else MemberMeta()
        local = MemberState(name, self.address, Status.ALIVE, int(incarnation), 0, meta, now)
        self.table = MemberTable(local, self._new_suspicion)
        self.awareness = Awareness(config.awareness_max_multiplier)
        self._broadcasts = BroadcastQueue(config.broadcast_queue_max)
        self._counters: Counter[str] = Counter()
        self._outgoing: list[Outgoing] = []
        self._events: list[MemberEvent | EventT] = []
        self._seq = rng.getrandbits(32)

        # Random phases so that members started together do not probe and gossip in step.
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        # The next push-pull is at _push_pull_from + _push_pull_phase * (the interval
        # scaled to the current N): re-evaluated as the cluster grows, so members that
        # joined a small cluster do not keep the small cluster's short interval (and
        # all fire at once).
        self._push_pull_from = now
        self._push_pull_phase = rng.uniform(0.1, 1.0)
        self._next_push_pull = now + self._push_pull_phase * config.push_pull_interval
        self._last_gossip = -_INF
        self._next_join = _INF
        # The delegate draws its timers' phases from the same rng, next.
        self._delegate.attach(self, now)
        self._delegate_handlers: dict[type, Handler] = dict(self._delegate.handlers())
        if not self._delegate_handlers.keys().isdisjoint(_OWN_MESSAGES):
            raise ValueError("a delegate cannot take over the membership protocol's messages")
        self._next_reconnect = now + rng.uniform(0.5, 1.0) * config.reconnect_interval
        self._source: Address | None = None  # of the datagram being handled
        self._joined = False
        self._probe: _Probe | None = None
        self._probe_list: list[str] = []
        self._probe_pos = 0
        self._relays: dict[int, _Relay] = {}
        self._relay_timers: list[tuple[float, int]] = []
        self._suspicion_timers: list[tuple[float, str, int]] = []
        self._reap_timers: list[tuple[float, str, float]] = []
        self._join_sources: OrderedDict[Address, float] = OrderedDict()
        self._push_pulls_answered: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._usable_cache: list[str] | None = None
        self._left = False
        self._unknown_senders: dict[str, float] = {}  # name -> first heard
        self._last_repair_pull = -_INF

    # ---- public API ------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self.table.local.incarnation

    @property
    def joined(self) -> bool:
        return self._joined

    @property
    def left(self) -> bool:
        return self._left

    @property
    def stats(self) -> Counter[str]:
        """Counters; drops are "drop.<reason>", including the Wire's."""
        out = Counter(self._counters)
        for reason, n in self.wire.drops.items():
            out["drop." + reason.value] += n
        out["members"] = len(self.table)
        out["members_live"] = self.table.live_count()
        out["broadcast_queue"] = len(self._broadcasts)
        self._delegate.stats(out)
        out["awareness"] = self.awareness.score
        out["incarnation"] = self.incarnation
        return out

    def join(self, now: float) -> None:
        if not self._peers - {self.address} and not self._group:
            self._joined = True  # nobody to contact: a cluster of one
            return
        self._joined = False
        self._delegate.joining(now)
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
        encoded = self.encode(Left(self.name, local.incarnation))
        self._broadcasts.queue(_member_key(self.name), encoded, self.config.retransmit_mult)
        # Flush: tell a few members directly (and the group) rather than waiting for
        # gossip rounds the agent may not stay around for.
        n = retransmit_limit(self.config.retransmit_mult, self.table.live_count())
        for name in self.table.random_live(self.rng, n):
            m = self.table.get(name)
            if m is not None:
                self._send(m.address, [encoded], piggyback=False)
        if self._group:
            self._send(GROUP, [encoded], piggyback=False)
        self._usable_cache = None

    def handle_datagram(self, now: float, data: bytes, source: Address) -> None:
        c = self._counters
        c["datagrams_received"] += 1
        c["bytes_received"] += len(data)
        opened = self.wire.open(now, data, source)
        if not isinstance(opened, Opened):
            return  # counted by the Wire
        sender = opened.sender
        m = self.table.get(sender)
        if m is None:
            if sender not in self._unknown_senders and len(self._unknown_senders) < 64:
                self._unknown_senders[sender] = now
        elif m.status in (Status.DEAD, Status.LEFT):
            self._tell_dead(m, source)
        table = self.table
        delegate_handlers = self._delegate_handlers
        for raw in opened.messages:
            # The bulk of gossip is an alive we already have; only such
            # already-superseded messages skip validation (and the malformed count).
            alive = peek_alive(raw)
            if alive is not None:
                name, incarnation = alive
                if name != self.name:
                    known = table.get(name)
                    if known is not None and incarnation <= known.incarnation:
                        c["alive_superseded"] += 1
                        continue
            msg = decode_received(raw)
            if msg is None:
                c["drop.malformed"] += 1
                continue
            handler = delegate_handlers.get(type(msg))
            if handler is not None:
                handler(now, msg, sender, source)
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
                self._send_indirect(p)
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
        self._delegate.tick(now)
        if now >= self._next_push_pull:
            if not self._left:
                self._push_pull(now)
            self._push_pull_from = now
            self._push_pull_phase = 1.0
            self._reschedule_push_pull()

    def next_deadline(self) -> float:
        d = min(self._next_probe, self._next_push_pull, self._next_join, self._delegate.next_deadline(),
                self._next_reconnect)
        if len(self._broadcasts):
            d = min(d, self._next_gossip)
        p = self._probe
        if p is not None:
            d = min(d, p.end_at if p.indirect else p.timeout_at)
        if self._suspicion_timers:
            d = min(d, self._suspicion_timers[0][0])
        if self._relay_timers:
            d = min(d, self._relay_timers[0][0])
        return d

    def take_outgoing(self) -> list[Outgoing]:
        self._delegate.flush()
        out, self._outgoing = self._outgoing, []
        return out

    def take_events(self) -> list[MemberEvent | EventT]:
        events, self._events = self._events, []
        return events

    def update_meta(self, meta: MemberMeta, now: float) -> None:
        local = self.table.local
        alive = Alive(self.name, self.address, local.incarnation + 1, local.meta_version + 1, meta)
        if len(self.encode(alive)) > self.wire.capacity:
            raise ValueError("meta too large to gossip in one datagram; report only failed observations")
        local.incarnation += 1
        local.meta_version += 1
        local.meta = meta
        self._usable_cache = None
        self._broadcast_self(now)
        self._events.append(MetaChanged(local.view()))

    def members(self) -> list[MemberView]:
        return [m.view() for m in self.table]

    def add_peers(self, peers: Iterable[Address], now: float) -> None:
        """Seeds learnt after the start (a name that resolved late): a join under way
        tries them at once; a member that has joined reaches those that are not live
        members in its reconnection rounds, as it does its first seeds."""
        new = {(str(ipaddress.ip_address(h)), int(p)) for h, p in peers} - self._peers
        if not new:
            return
        self._peer_list = tuple(sorted(self._peers | new))
        self._peers = frozenset(self._peer_list)
        if not self._joined and self._next_join != _INF:
            self._next_join = now

    def usable_backends(self) -> list[str]:
        if self._usable_cache is None:
            self._usable_cache = _usable_backends(self.members())
        return list(self._usable_cache)

    # ---- the delegate's host (delegate.Host) -------------------------------------------

    @property
    def counters(self) -> Counter[str]:
        return self._counters

    @property
    def has_group(self) -> bool:
        return self._group

    @property
    def capacity(self) -> int:
        return self.wire.capacity

    def encode(self, message: Message) -> bytes:
        return self.wire.encode(encode(message))

    def broadcast(self, key: Hashable, data: bytes, mult: int) -> None:
        self._broadcasts.queue(key, data, mult)

    def expedite(self, now: float, delay: float) -> None:
        # Fresh news goes out after a short batching delay instead of waiting for the
        # next gossip round, so each epidemic hop costs milliseconds, not ~100 ms.
        # Expedited rounds are still spaced by a quarter interval, which bounds the
        # datagram rate during mass churn.
        due = max(now + delay, self._last_gossip + self.config.gossip_interval / 4)
        if due < self._next_gossip:
            self._next_gossip = due

    def broadcast_transmits(self, key: Hashable) -> int | None:
        return self._broadcasts.transmits(key)

    def send(self, dest: Destination, messages: list[bytes]) -> int:
        return self._send(dest, messages, piggyback=False)

    def reply_dest(self, sender: str, source: Address) -> Address | None:
        if self._allowed(source):
            return source
        m = self.table.get(sender)
        if m is not None and m.status in (Status.ALIVE, Status.SUSPECT):
            return m.address
        self._counters["reply_refused"] += 1
        return None

    def live_count(self) -> int:
        return self.table.live_count()

    def live_metas(self) -> Iterator[MemberMeta]:
        t = self.table
        for name in t.live_names():
            m = t.get(name)
            if m is not None:
                yield m.meta

    def random_peer(self) -> Address | None:
        names = self.table.random_live(self.rng, 1, alive_only=True)
        m = self.table.get(names[0]) if names else None
        return None if m is None else m.address

    def emit(self, event: EventT) -> None:
        self._events.append(event)

    # ---- sending ---------------------------------------------------------------------

    def _allowed(self, dest: Destination) -> bool:
        if isinstance(dest, tuple):
            return self.table.name_at(dest) is not None or dest in self._peers or dest in self._join_sources
        return self._group  # GROUP

    def _send(self, dest: Destination, primary: list[bytes], piggyback: bool = True) -> int:
        """Seal ``primary`` (and, with ``piggyback``, queued broadcasts that fit) to
        ``dest``; the number of datagrams sent."""
        if not self._allowed(dest):
            self._counters["send_refused"] += 1
            return 0
        msgs = list(primary)
        if piggyback:
            used = sum(len(m) for m in msgs)
            cap = self.wire.capacity
            if used < cap:
                msgs.extend(self._broadcasts.take(cap - used, 0, self.table.live_count()))
        if not msgs:
            return 0
        try:
            datagrams = self.wire.seal(msgs)
        except ValueError:
            self._counters["send_oversized"] += 1
            return 0
        c = self._counters
        for d in datagrams:
            self._outgoing.append(Outgoing(dest, d))
            c["datagrams_sent"] += 1
            c["bytes_sent"] += len(d)
        return len(datagrams)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _broadcast(self, name: str, msg: Message, now: float) -> None:
        self._broadcasts.queue(_member_key(name), self.encode(msg), self.config.retransmit_mult)
        self.expedite(now, self.config.update_batch_delay)

    def _self_alive(self) -> Alive:
        local = self.table.local
        return Alive(self.name, self.address, local.incarnation, local.meta_version, local.meta)

    def _broadcast_self(self, now: float) -> None:
        self._broadcast(self.name, self._self_alive(), now)

    # ---- dispatch --------------------------------------------------------------------

    def _dispatch(self, now: float, msg: Message, sender: str, source: Address) -> None:
        if type(msg) is Ping:
            self._on_ping(msg, sender, source)
        elif type(msg) is Ack:
            self._on_ack(msg, sender)
        elif type(msg) is Alive:
            self._on_alive(now, msg)
        elif type(msg) is Suspect:
            self._on_suspect(now, msg)
        elif type(msg) is Dead:
            self._on_dead(now, msg)
        elif type(msg) is Left:
            self._on_left(now, msg)
        elif type(msg) is PingReq:
            self._on_ping_req(now, msg, sender, source)
        elif type(msg) is Nack:
            self._on_nack(msg, sender)
        elif type(msg) is PushPull:
            self._on_push_pull(now, msg, sender, source)

    def _tell_dead(self, m: MemberState, source: Address) -> None:
        # A member we hold dead (or gone) is talking to us: a false positive, a forged
        # claim, or a restart. Tell it directly so it refutes now, not at the next
        # push-pull. A member really leaving ignores this.
        if self._allowed(source):
            self._counters["dead_notified"] += 1
            msg = (Dead(m.name, m.incarnation, self.name) if m.status is Status.DEAD
                   else Left(m.name, m.incarnation))
            self._send(source, [self.encode(msg)], piggyback=False)

    # ---- probing ---------------------------------------------------------------------

    def _on_ping(self, msg: Ping, sender: str, source: Address) -> None:
        if msg.target != self.name:
            self._counters["ping_misdirected"] += 1
            return
        dest = self.reply_dest(sender, source)
        if dest is not None:
            self._send(dest, [self.encode(Ack(msg.seq))])

    def _on_ack(self, msg: Ack, sender: str) -> None:
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
            self._send(r.requester_addr, [self.encode(Ack(r.their_seq))])
            self._counters["pingreq_acked"] += 1

    def _on_nack(self, msg: Nack, sender: str) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq and sender in p.helpers:
            p.nacks += 1

    def _on_ping_req(self, now: float, msg: PingReq, sender: str, source: Address) -> None:
        requester = self.table.get(sender)
        target = self.table.get(msg.target)
        if (requester is None or target is None or msg.target == self.name
                or target.status not in (Status.ALIVE, Status.SUSPECT)):
            self._counters["pingreq_refused"] += 1
            return
        if len(self._relays) >= self.config.pending_probes_max:
            self._counters["pingreq_overflow"] += 1
            return
        dest = self.reply_dest(sender, source)
        if dest is None:
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(sender, dest, msg.seq, msg.target, msg.nack)
        # Nack a little before a full probe timeout: the requester sent this after its
        # own probe timeout and judges at the end of its probe interval, so a nack sent
        # after a full timeout would always arrive too late to count.
        heapq.heappush(self._relay_timers, (now + 0.8 * self.config.probe_timeout, seq))
        self._counters["pingreq_relayed"] += 1
        self._send(target.address, [self.encode(Ping(seq, msg.target))])

    def _run_relay_timers(self, now: float) -> None:
        heap = self._relay_timers
        while heap and heap[0][0] <= now:
            _, seq = heapq.heappop(heap)
            r = self._relays.pop(seq, None)
            if r is not None and r.nack:
                self._send(r.requester_addr, [self.encode(Nack(r.their_seq))])
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
            primary.append(self.encode(Suspect(m.name, m.incarnation, self.name)))
        primary.append(self.encode(Ping(seq, m.name)))
        self._counters["probes"] += 1
        self._probe = _Probe(seq, m.name, now,
                             now + self.awareness.scale(self.config.probe_timeout),
                             now + self.awareness.scale(self.config.probe_interval))
        self._send(m.address, primary)

    def _send_indirect(self, p: _Probe) -> None:
        p.indirect = True
        helpers = self.table.random_live(self.rng, self.config.indirect_checks, exclude=(p.target,),
                                         alive_only=True)
        p.helpers = tuple(helpers)
        encoded = self.encode(PingReq(p.seq, p.target, True))
        for h in helpers:
            m = self.table.get(h)
            if m is not None:
                self._send(m.address, [encoded])
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
            # healed partition where our gossip does not go yet: answer it directly
            # (and the delegate repairs what either side missed while we were doubted).
            self._send(src, [self.encode(self._self_alive())], piggyback=False)
            self._delegate.member_back(src, now)

    def _on_alive(self, now: float, a: Alive) -> None:
        v, meta_changed = self.table.apply_alive(a, now)
        if v is Verdict.IGNORED:
            return
        if v is Verdict.REFUTE:
            self._refute(a.incarnation, now)
            return
        self._usable_cache = None
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
            # side may have missed the other's news.
            self._delegate.member_back(m.address, now)
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
        heapq.heappush(self._suspicion_timers, (m.suspicion.deadline, s.name, s.incarnation))
        if v is Verdict.SUSPECTED:
            self._counters["suspicions"] += 1
            self._usable_cache = None
            self._events.append(MemberSuspect(m.view()))
        else:
            self._counters["suspicion_confirmations"] += 1

    def _run_suspicion_timers(self, now: float) -> None:
        heap = self._suspicion_timers
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
        self._usable_cache = None
        heapq.heappush(self._reap_timers, (now + self.config.dead_reap_interval, d.name, now))
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
        self._usable_cache = None
        heapq.heappush(self._reap_timers, (now + self.config.dead_reap_interval, lv.name, now))
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
        for name, since in list(self._unknown_senders.items()):
            if self.table.get(name) is not None:
                del self._unknown_senders[name]
            elif now - since >= grace:
                overdue = True
        if overdue and self._joined and not self._left and now - self._last_repair_pull >= grace:
            self._last_repair_pull = now
            self._unknown_senders.clear()
            self._counters["view_repair_pulls"] += 1
            self._push_pull(now)

    def _reschedule_push_pull(self) -> None:
        self._next_push_pull = self._push_pull_from + self._push_pull_phase * push_pull_scale(
            self.config.push_pull_interval, self.table.live_count())

    def _maintain(self, now: float) -> None:
        self._reschedule_push_pull()
        if self._unknown_senders:
            self._check_unknown_senders(now)
        heap = self._reap_timers
        while heap and heap[0][0] <= now:
            _, name, since = heapq.heappop(heap)
            m = self.table.get(name)
            if m is None or m.status not in (Status.DEAD, Status.LEFT) or m.status_since != since:
                continue
            self.table.remove(name)
            self._broadcasts.discard(_member_key(name))
            self.wire.forget_sender(name)
            self._counters["members_reaped"] += 1
        self._delegate.maintain(now)
        js = self._join_sources
        while js and next(iter(js.values())) <= now:
            js.popitem(last=False)

    # ---- gossip ----------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        self._next_gossip = now + self.config.gossip_interval
        if not len(self._broadcasts):
            return
        self._last_gossip = now
        n = self.table.live_count()
        cap = self.wire.capacity
        # A burst (a delegate may queue thousands of broadcasts a second) needs more
        # than one datagram per target and round, or the queue overflows and drops;
        # quiet rounds still send one.
        targets = self.table.random_live(self.rng, self.config.gossip_nodes)
        if targets and len(targets) >= n - 1:
            self._gossip_to_all(targets)
            return
        for name in targets:
            m = self.table.get(name)
            if m is None:
                continue
            sent: set[Hashable] = set()
            for _ in range(self.config.gossip_max_datagrams):
                msgs = self._broadcasts.take(cap, 0, n, taken=sent)
                if not msgs:
                    break
                self._send(m.address, msgs, piggyback=False)
                self._counters["gossip_datagrams"] += 1
            if not len(self._broadcasts):
                break

    def _gossip_to_all(self, targets: list[str]) -> None:
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
        # What the delegate says a round to everyone delivers for good is taken once.
        final = self._delegate.final_after_full_round
        for _ in range(self.config.gossip_max_datagrams):
            msgs = self._broadcasts.take(cap, 0, n, copies=len(addrs), final=final)
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
                    self._outgoing.append(Outgoing(a, d))
                    c["datagrams_sent"] += 1
                    c["bytes_sent"] += len(d)
                c["gossip_datagrams"] += 1

    # ---- push-pull and join ----------------------------------------------------------

    def _send_join(self, now: float) -> None:
        self._next_join = now + self.config.join_retry_interval
        for p in self._peer_list:
            if p != self.address:
                self._send_state(p, now, nonce=self._next_seq(), reply=False, join=True)
        if self._group:
            # Only our own record: whoever answers sends the full state.
            encoded = self.encode(PushPull(self._next_seq(), False, True, True, 0, 1,
                                           (self.table.local.record(),)))
            self._send(GROUP, [encoded], piggyback=False)
        self._counters["join_attempts"] += 1

    def _push_pull(self, now: float) -> None:
        names = self.table.random_live(self.rng, 1, alive_only=True)
        if not names:
            return
        m = self.table.get(names[0])
        if m is None:
            return
        self._counters["push_pulls"] += 1
        self._send_state(m.address, now, nonce=self._next_seq(), reply=False, join=False)

    def _state_chunks(self, nonce: int, reply: bool, join: bool) -> list[bytes]:
        budget = self.wire.capacity - 48  # room for the chunk's own header fields
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
        return [self.encode(PushPull(nonce, reply, join, False, i, count, tuple(g))) for i, g in enumerate(groups)]

    def _send_state(self, dest: Address, now: float, *, nonce: int, reply: bool, join: bool) -> None:
        msgs = self._state_chunks(nonce, reply, join)
        msgs.extend(self._delegate.local_state(now, join=join, reply=reply))
        self._send(dest, msgs, piggyback=False)

    def _on_push_pull(self, now: float, msg: PushPull, sender: str, source: Address) -> None:
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
            self._push_pull_from = now
            self._push_pull_phase = self.rng.uniform(0.1, 1.0)
            self._reschedule_push_pull()
        if msg.reply:
            return
        key = (sender, msg.nonce)
        if key in self._push_pulls_answered:
            return
        self._push_pulls_answered[key] = None
        while len(self._push_pulls_answered) > 256:
            self._push_pulls_answered.popitem(last=False)
        if msg.group:
            n = self.table.live_count()
            if self.rng.random() >= min(1.0, self.config.group_join_replies / max(1, n - 1)):
                return
        dest = self.reply_dest(sender, source)
        if dest is not None:
            self._send_state(dest, now, nonce=msg.nonce, reply=True, join=False)

    def _reconnect(self, now: float) -> None:
        dead = [m for m in self.table if m.status is Status.DEAD]
        if dead:
            # A bare ping is enough: if the member is up, one of us holds the other dead,
            # and any datagram from a member held dead makes the receiver tell it so;
            # the refutation goes straight back, and gossip spreads it on both sides.
            m = dead[self.rng.randrange(len(dead))]
            self._counters["reconnects"] += 1
            self._send(m.address, [self.encode(Ping(self._next_seq(), m.name))], piggyback=False)
            return
        lost = [p for p in self._peer_list if p != self.address and not self._live_at(p)]
        if lost:
            self._counters["reconnects"] += 1
            self._send_state(lost[self.rng.randrange(len(lost))], now, nonce=self._next_seq(), reply=False,
                             join=True)

    def _live_at(self, address: Address) -> bool:
        name = self.table.name_at(address)
        m = self.table.get(name) if name is not None else None
        return m is not None and m.status in (Status.ALIVE, Status.SUSPECT)

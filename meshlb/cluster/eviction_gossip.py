"""Eviction dissemination: the payload that rides on the SWIM engine as its delegate.

An agent publishes the flows its data plane must forget everywhere (a socket closed);
every member learns each of them once, soon, whatever the loss:

* evictions are numbered per origin within an epoch (the origin's starting
  incarnation) and their receipt is idempotent (evictions.py);
* a batch of closes goes as flow records in runs (:class:`EvictionRun`, as many as fit a
  datagram) while every live member takes runs, as single evictions otherwise;
* they go to the multicast group at once where there is one (held until the owner takes
  the datagrams, so a batch shares them), and are queued for gossip with their own
  retransmit budget, expedited after ``eviction_batch_delay``;
* a member relays what is new to it only in a cluster larger than one gossip round
  reaches; below that the origin's rounds reach everyone;
* misses are repaired from a digest (per origin: the contiguous mark and some seqs
  above it) sent with every push-pull, to a random member every
  ``eviction_sync_interval`` while evictions flow, and at once to a member that comes
  back; the peer answers with the buffered evictions the digest lacks.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable, Mapping
from typing import NamedTuple

from .delegate import GROUP, Address, Handler, Host
from .evictions import EvictionTracker, Receipt
from .messages import (
    FLOW_RECORD_SIZE,
    MAX_RUN,
    MAX_U64,
    RUNS_VERSION,
    DigestEntry,
    Eviction,
    EvictionDigest,
    EvictionRun,
    FlowTuple,
    canonical_ip,
    flow_tuple_of,
    valid_records,
)
from .protocol_config import ProtocolConfig

__all__ = ["EvictionGossip", "EvictionReceived", "EvictionsReceived", "EvictionEvent"]


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


EvictionEvent = EvictionReceived | EvictionsReceived

_tuple_new = tuple.__new__  # skips NamedTuple's generated __new__


def _key(origin: str, epoch: int, seq: int) -> Hashable:
    """Broadcast key of an eviction, or of a run by its first eviction."""
    return ("e", origin, epoch, seq)


class EvictionGossip:
    """The eviction payload of one member (a :class:`meshlb.cluster.delegate.Delegate`)."""

    def __init__(self, *, name: str, epoch: int, config: ProtocolConfig) -> None:
        self.name = name
        self.epoch = int(epoch)
        self.config = config
        self.tracker = EvictionTracker(
            buffer_max=config.eviction_buffer_max, buffer_ttl=config.eviction_buffer_ttl,
            gap_timeout=config.eviction_gap_timeout, digest_recent=config.eviction_digest_recent,
            repair_max=config.eviction_repair_max, origins_max=config.eviction_origins_max)
        # set by attach: the node, its counters, whether it has a group
        self.host: Host[EvictionEvent]
        self._counters: Counter[str] = Counter()
        self._has_group = False
        self._last_seq = 0  # of this member's own evictions
        self._run_capacity: int | None = None
        # own evictions not yet in any datagram, oldest first (see sent_through)
        self._unsent: deque[int] = deque()
        self._group_pending: list[bytes] = []
        self._awaiting_baseline = False
        self._next_sync = float("inf")

    # ---- the delegate ----------------------------------------------------------------

    def attach(self, host: Host[EvictionEvent], now: float) -> None:
        self.host = host
        self._counters = host.counters
        self._has_group = host.has_group
        self._next_sync = now + host.rng.uniform(0.5, 1.0) * self.config.eviction_sync_interval

    def handlers(self) -> Mapping[type, Handler]:
        return {
            EvictionRun: self._on_run,
            Eviction: self._on_eviction,
            EvictionDigest: self._on_digest,
        }

    def local_state(self, now: float, *, join: bool, reply: bool) -> list[bytes]:
        entries = self.tracker.digest(now)
        if join and all(e.origin == self.name for e in entries):
            # A fresh joiner has seen no eviction; its empty digest would make the seed
            # send its whole buffer, so it takes the seed's marks from the reply instead.
            # A member that has marks (restored after a restart, or one reconnecting
            # after a partition) sends them and gets what it missed.
            return []
        return self._digest_messages(EvictionDigest(reply, tuple(entries)))

    def joining(self, now: float) -> None:
        self._awaiting_baseline = True

    def member_back(self, address: Address, now: float) -> None:
        # Each side may have missed the other's evictions while they could not hear
        # each other: our digest makes it send what we lack now rather than at some
        # later anti-entropy round.
        entries = self.tracker.digest(now)
        if not entries:
            return
        host = self.host
        self._counters["eviction_digests_on_rejoin"] += 1
        host.send(address, self._digest_messages(EvictionDigest(False, tuple(entries))))

    def final_after_full_round(self, key: Hashable) -> bool:
        # An eviction in a round that reached every member would only come again as
        # a duplicate that each of them decrypts, decodes and drops (thousands a second
        # under connection-per-request load). A copy lost on the way is what the digest
        # repairs.
        return self.config.eviction_once_to_all and type(key) is tuple and key[0] == "e"

    def tick(self, now: float) -> None:
        if now >= self._next_sync:
            self._next_sync = now + self.config.eviction_sync_interval
            if not self.host.left:
                self._sync(now)

    def next_deadline(self) -> float:
        return self._next_sync

    def maintain(self, now: float) -> None:
        self.tracker.expire(now)

    def flush(self) -> None:
        if self._group_pending:
            pending, self._group_pending = self._group_pending, []
            host = self.host
            self._counters["group_datagrams_sent"] += host.send(GROUP, pending)

    def stats(self, out: Counter[str]) -> None:
        out["eviction_buffer"] = self.tracker.buffered

    # ---- publishing ------------------------------------------------------------------

    def publish(self, key: FlowTuple, now: float) -> int:
        """Queue an eviction of ``key`` for every member; returns its number."""
        if key.proto not in (6, 17):
            raise ValueError("proto must be 6 (TCP) or 17 (UDP)")
        if not (0 <= key.client_port <= 65535 and 0 <= key.vip_port <= 65535):
            raise ValueError("ports must be in 0..65535")
        canonical = _tuple_new(FlowTuple, (canonical_ip(key.client), key.client_port,
                                           canonical_ip(key.vip), key.vip_port, key.proto))
        host = self.host
        self._last_seq += 1
        ev = _tuple_new(Eviction, (self.name, self.epoch, self._last_seq, canonical))
        self.tracker.receive(ev, now)
        encoded = host.encode(ev)
        self._counters["evictions_sent"] += 1
        self._to_group(encoded)
        self._queue(ev, encoded, now)
        self._unsent.append(self._last_seq)
        if len(self._unsent) > self.config.broadcast_queue_max:
            self._prune_unsent()  # nobody asks (a simulator, a bench): stay bounded
        return self._last_seq

    def publish_many(self, keys: Iterable[FlowTuple], now: float) -> int:
        """:meth:`publish` for each of ``keys``; one refused (not TCP/UDP, a port out of
        range, not an address) is counted and skipped, so one bad record cannot drop
        the batch it came in. Returns the number of the last eviction published (0:
        none)."""
        seq = 0
        for key in keys:
            try:
                seq = self.publish(key, now)
            except ValueError:
                self._counters["evictions_refused"] += 1
        return seq

    def publish_records(self, records: Iterable[bytes], now: float) -> int:
        """Queue evictions of flows given as flow records (:func:`flow_record`, the data
        plane's keys), in runs of up to :data:`MAX_RUN` per message while every live
        member takes runs, one message each otherwise. A record that is not one is
        counted and skipped. Returns the number of the last eviction published (0: none)."""
        host = self.host
        c = self._counters
        good = []
        for r in records:
            if type(r) is bytes and len(r) == FLOW_RECORD_SIZE and valid_records(r):
                good.append(r)
            else:
                c["evictions_refused"] += 1
        if not good:
            return 0
        per_run = self.run_capacity() if self._runs_welcome() else 0
        if per_run < 2:
            return self.publish_many([flow_tuple_of(r) for r in good], now)
        name, epoch = self.name, self.epoch
        mult = self.config.eviction_retransmit_mult
        for i in range(0, len(good), per_run):
            chunk = good[i:i + per_run]
            first = self._last_seq + 1
            self._last_seq += len(chunk)
            self.tracker.receive_run(name, epoch, first, chunk, now)
            encoded = host.encode(_tuple_new(EvictionRun, (name, epoch, first, b"".join(chunk))))
            c["evictions_sent"] += len(chunk)
            c["eviction_runs_sent"] += 1
            self._to_group(encoded)
            # keyed by its first eviction, as a single one would be: sent_through looks
            # for the first unsent one's key
            host.broadcast(_key(name, epoch, first), encoded, mult)
            self._unsent.append(first)
        host.expedite(now, self.config.eviction_batch_delay)
        if len(self._unsent) > self.config.broadcast_queue_max:
            self._prune_unsent()
        return self._last_seq

    def run_capacity(self) -> int:
        """Flow records per run that fit in one datagram with any seq."""
        if self._run_capacity is None:
            host = self.host
            empty = len(host.encode(EvictionRun(self.name, self.epoch, MAX_U64, b"")))
            # 2 to spare: past 255 bytes of records their bin header is one byte longer
            self._run_capacity = max(0, min(MAX_RUN, (host.capacity - empty - 2) // FLOW_RECORD_SIZE))
        return self._run_capacity

    def sent_through(self) -> int:
        """The number of this member's own evictions up to which every one has gone
        out in at least one datagram, or will never go (dropped from a full queue),
        or has nobody to go to (a joined member alone). A reader of socket closes
        keeps each close it acted on until this passes the eviction it published, so
        a close is never lost with a process killed before telling its peers."""
        q = self._unsent
        host = self.host
        if host.joined and host.live_count() <= 1:
            q.clear()
        self._prune_unsent()
        return q[0] - 1 if q else self._last_seq

    def marks(self) -> list[DigestEntry]:
        """Per other origin, the eviction number up to which every eviction was seen."""
        return [e for e in self.tracker.marks() if e.origin != self.name]

    def restore_marks(self, entries: Iterable[DigestEntry], now: float) -> None:
        """Resume from marks saved by a previous run of this member (before it joins)."""
        n = self.tracker.restore([e for e in entries if e.origin != self.name], now)
        self._counters["eviction_marks_restored"] += n

    def _to_group(self, encoded: bytes) -> None:
        # evictions go to the multicast group at once, where there is one
        if self._has_group:
            self._group_pending.append(encoded)
            if len(self._group_pending) > self.config.eviction_buffer_max:
                # The owner is not draining its datagrams; gossip still carries these.
                del self._group_pending[0]
                self._counters["group_evictions_dropped"] += 1

    def _queue(self, ev: Eviction, encoded: bytes, now: float) -> None:
        self.host.broadcast(_key(ev.origin, ev.epoch, ev.seq), encoded, self.config.eviction_retransmit_mult)
        self.host.expedite(now, self.config.eviction_batch_delay)

    def _prune_unsent(self) -> None:
        # an item gone from the queue went out as often as it should, or was dropped
        q, transmits, name, epoch = self._unsent, self.host.broadcast_transmits, self.name, self.epoch
        while q and transmits(_key(name, epoch, q[0])) != 0:
            q.popleft()

    def _runs_welcome(self) -> bool:
        """Every live member takes runs of evictions (an older one would drop them)."""
        return all(meta.version >= RUNS_VERSION for meta in self.host.live_metas())

    # ---- receiving -------------------------------------------------------------------

    def _on_run(self, now: float, run: EvictionRun, sender: str, source: Address) -> None:
        data = run.records
        records = [data[i:i + FLOW_RECORD_SIZE] for i in range(0, len(data), FLOW_RECORD_SIZE)]
        new = self.tracker.receive_run(run.origin, run.epoch, run.first, records, now)
        host = self.host
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
        host.emit(_tuple_new(EvictionsReceived, (run.origin, seqs, got)))
        if host.live_count() - 1 > self.config.gossip_nodes:
            if self._runs_welcome():
                host.broadcast(_key(run.origin, run.epoch, first), host.encode(run), self.config.eviction_retransmit_mult)
                host.expedite(now, self.config.eviction_batch_delay)
            else:
                # The origin did not know of an older member this one knows (it joined
                # since, or the news has not reached the origin): a run would be
                # dropped there as malformed, single evictions are read by every version.
                origin, epoch = run.origin, run.epoch
                for seq, rec in zip(seqs, got):
                    ev = _tuple_new(Eviction, (origin, epoch, seq, flow_tuple_of(rec)))
                    self._queue(ev, host.encode(ev), now)
                c["evictions_relayed_singly"] += len(got)
        else:
            c["evictions_not_relayed"] += len(new)

    def _on_eviction(self, now: float, ev: Eviction, sender: str, source: Address) -> None:
        r = self.tracker.receive(ev, now)
        host = self.host
        c = self._counters
        if r is Receipt.NEW:
            c["evictions_received"] += 1
            host.emit(_tuple_new(EvictionReceived, (ev.tuple, ev.origin, ev.seq)))
            if host.live_count() - 1 > self.config.gossip_nodes:
                self._queue(ev, host.encode(ev), now)
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

    # ---- repair ----------------------------------------------------------------------

    def _digest_messages(self, digest: EvictionDigest) -> list[bytes]:
        host = self.host
        cap = host.capacity - 16
        out: list[bytes] = []
        batch: list[DigestEntry] = []
        used = 0
        for e in digest.entries:
            size = len(e.origin) + 12 + 9 * len(e.recent) + 20
            if batch and used + size > cap:
                out.append(host.encode(EvictionDigest(digest.reply, tuple(batch))))
                batch, used = [], 0
            batch.append(e)
            used += size
        if batch or not out:
            out.append(host.encode(EvictionDigest(digest.reply, tuple(batch))))
        return out

    def _sync(self, now: float) -> None:
        entries = self.tracker.digest(now)
        if not entries:
            return
        host = self.host
        dest = host.random_peer()
        if dest is None:
            return
        self._counters["eviction_syncs"] += 1
        host.send(dest, self._digest_messages(EvictionDigest(False, tuple(entries))))

    def _on_digest(self, now: float, msg: EvictionDigest, sender: str, source: Address) -> None:
        if msg.reply and self._awaiting_baseline:
            self._awaiting_baseline = False
            self.tracker.adopt_baseline(msg.entries, now)
        missing = self.tracker.missing(msg.entries)
        if not missing:
            return
        host = self.host
        dest = host.reply_dest(sender, source)
        if dest is None:
            return
        self._counters["evictions_repair_sent"] += len(missing)
        host.send(dest, [host.encode(ev) for ev in missing])

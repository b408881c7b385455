"""The eviction pump: socket closes in, evictions out, and peers' evictions applied.

The tracer reports closes of balanced flows in batches. Each batch is evicted from this
mix's conntrack in one call, published to the cluster in one call, and stays in the
pinned ring buffer until the protocol reports its evictions gone out in a datagram: an
agent killed in between leaves them for the next one to read and publish again,
instead of taking them along. Peers' evictions are collected for one turn of the event
loop (a datagram carries many) and applied in one call too. The marks of how far every
origin's evictions were applied here are saved beside conntrack, for a restarted agent.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import struct
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from meshlb.cluster.driver import GossipDriver
from meshlb.cluster.messages import FlowTuple
from meshlb.cluster.node import (
    EvictionReceived,
    EvictionsReceived,
    MemberDead,
    MemberLeft,
    MemberSuspect,
    MemberUp,
    MetaChanged,
)
from meshlb.config import VipConfig
from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import Balancer
from meshlb.dataplane.libbpf import BpfError
from meshlb.dataplane.marks import MarkStore
from meshlb.dataplane.tracer import Flow, SockEvent, Tracer

log = logging.getLogger(__name__)

# Socket closes are read at most every 5 ms: a burst costs one loop wakeup per batch,
# not per close, and 5 ms is nothing against the eviction's trip through the cluster.
TRACER_BATCH_DELAY_S = 0.005
# At most this many closes per batch: a reader behind a backlog of thousands must not
# hold the loop for all of them while probes wait (peers would suspect a busy member).
TRACER_MAX_BATCH = 256
# Longest a batch of socket closes waits in the ring for its evictions to go out.
CLOSES_HOLD_MAX_S = 1.0
MARKS_SAVE_INTERVAL_S = 1.0
# (backend_id, flags, syn_seq) of a struct ct_value's bytes: what decides whether a
# close is this mix's alone (EvictionPump.balanced_here_only)
_CT_OWNER = struct.Struct(f"={L.CtValue.backend_id.offset}xII"
                          f"{L.CtValue.syn_seq.offset - L.CtValue.flags.offset - 4}xI")
assert (L.CtValue.flags.offset == L.CtValue.backend_id.offset + 4
        and _CT_OWNER.size == ctypes.sizeof(L.CtValue))


class EvictionPump:
    """Between the tracer, this mix's balancer and the gossip driver. ``counts`` is the
    agent's eviction counters (``meshlb stats``); ``local_ids`` the backend ids of this
    node's own backends, as table sync keeps them."""

    def __init__(self, balancer: Balancer, tracer: Tracer, driver: GossipDriver, marks: MarkStore, *,
                 counts: Counter[str], local_ids: Collection[int], vips: Sequence[VipConfig] = ()) -> None:
        self.balancer = balancer
        self.tracer = tracer
        self.driver = driver
        self.marks = marks
        self.counts = counts
        self.local_ids = local_ids
        self._closing: list[SockEvent] = []  # this batch's balanced closes
        self._to_publish: list[bytes] = []
        self._published_seq = 0  # number of this run's last own eviction
        self._held_through: int | None = None  # the held batch waits for this eviction
        self._hold_timer: asyncio.TimerHandle | None = None
        self._received: list[bytes] = []  # peers' evictions, applied once per loop turn
        # what every close is checked against: VIP endpoints, and member addresses
        # (forgotten whenever a member comes, goes or changes)
        self._vip_ends: frozenset[tuple[str, int]] = frozenset()
        self._member_addrs: frozenset[str] | None = None
        self.set_vips(vips)

    def set_vips(self, vips: Iterable[VipConfig]) -> None:
        self._vip_ends = frozenset((str(v.address), v.port) for v in vips)

    def members_changed(self, event: object = None) -> None:
        self._member_addrs = None

    def cluster_handlers(self) -> dict[type, Callable[[Any], None]]:
        """What the pump does with each kind of cluster event."""
        return {
            EvictionsReceived: lambda e: self.receive_records(e.records),
            EvictionReceived: lambda e: self.receive(e.tuple),
            **dict.fromkeys((MemberUp, MemberSuspect, MemberDead, MemberLeft, MetaChanged), self.members_changed),
        }

    # ------------------------------------------------------------------ own closes

    def start(self) -> None:
        self.driver.on_sent = self.release_closes
        self.tracer.start(callback=self.on_close, batch_delay=TRACER_BATCH_DELAY_S,
                          on_batch=self.end_batch, max_batch=TRACER_MAX_BATCH)

    def stop(self) -> None:
        """Closes not yet read, or read but unsent, stay in the ring for the next agent;
        peers' evictions already received are applied."""
        self.tracer.stop()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        try:
            self.apply_received()
        except Exception as exc:  # noqa: BLE001 - shutting down: say so and go on
            log.warning("cannot apply the last evictions received: %s", exc)

    def on_close(self, ev: SockEvent) -> None:
        """One close (or reset) of a batch the tracer is reading."""
        if not self.is_balanced_flow(ev.flow):
            # e.g. a peer's health check of this node's app: not a balanced flow, and
            # gossiping it would only cost every member a useless eviction
            self.counts["socket_closed_unbalanced"] += 1
            return
        # a segment no socket took here: the flow is over for its client (reset) and no
        # socket of it will close here; evicted like a close
        self.counts["flow_refused" if ev.refused else "socket_closed"] += 1
        # evicted and published with the rest of its batch (end_batch): one syscall and
        # one flush of the protocol per batch, not per close
        self._closing.append(ev)

    def end_batch(self) -> None:
        """The tracer read a batch: evict and publish it, and hold it in the ring until
        its evictions went out."""
        self.evict_closes()
        self.publish()
        self._held_through = self._published_seq
        self._hold_timer = asyncio.get_running_loop().call_later(CLOSES_HOLD_MAX_S, self._release_held)
        self.release_closes()

    def release_closes(self) -> None:
        """After each send of the driver: the held batch goes once its evictions did."""
        need = self._held_through
        if need is not None and self.driver.evictions_sent_through() >= need:
            self._release_held(sent=True)

    def _release_held(self, sent: bool = False) -> None:
        if self._held_through is None:
            return
        if not sent:
            # gossip is stuck or nobody has answered the join: local evictions must
            # not stall behind it
            self.counts["closes_released_unsent"] += 1
        self._held_through = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.tracer.commit()

    def evict_closes(self) -> None:
        closing, self._closing = self._closing, []
        if not closing:
            return
        # the program wrote each key exactly as conntrack keys the flow
        results = self.balancer.evict_many([ev.raw_key for ev in closing])
        for ev, (result, ct) in zip(closing, results, strict=True):
            if result != L.MLB_EVICT_NONE:
                self.counts["applied_local"] += 1
            if result == L.MLB_EVICT_FORWARD and not ev.refused and self.balanced_here_only(ct):
                # the router brought every packet of it here and this mix passed them
                # to itself: no other mix holds the flow, nobody needs to hear of it
                self.counts["local_only"] += 1
                continue
            # the key as the program wrote it is the flow record the protocol sends
            self._to_publish.append(ev.raw_key)

    def balanced_here_only(self, ct: bytes) -> bool:
        """An entry (the bytes of its ct_value) set up here by the flow's SYN, for this
        node's own backend, that never saw a packet of the flow come from a peer (the
        data plane marks that, and entries picked up mid-flow). A flow whose SYN
        reached another mix first and whose retransmitted SYN came here (the router
        changed its mind in between) leaves that mix an entry that never saw the
        client's ACK: the handshake timeout removes it."""
        backend_id, flags, syn_seq = _CT_OWNER.unpack(ct)
        return syn_seq != 0 and not flags & L.MLB_CT_F_PEER_SEEN and backend_id in self.local_ids

    def publish(self) -> None:
        flows, self._to_publish = self._to_publish, []
        if not flows:
            return
        if not self.driver.running:
            self.counts["unpublished_left_cluster"] += len(flows)  # closes after the leave
            return
        seq = self.driver.publish_eviction_records(flows)
        if seq:
            self._published_seq = seq
        self.counts["sent"] += len(flows)

    def is_balanced_flow(self, f: Flow) -> bool:
        """A closed socket whose local end is a VIP is a balanced flow. One whose local
        end is this node's nat backend endpoint is one only if its remote end is a SNAT
        source: the tracer already keeps remote ports to the SNAT range; the address
        must be a member's. Until the join is answered the members are unknown (a
        restarted agent replaying the closes its previous life left unsent): an
        eviction too many costs a lookup, one too few leaves a flow behind."""
        if (f.dst, f.dport) in self._vip_ends:
            return True
        if not self.driver.joined:
            return True
        addrs = self._member_addrs
        if addrs is None:
            addrs = self._member_addrs = frozenset(
                a for m in self.driver.members() for a in (m.address[0], *m.meta.addresses))
        return f.src in addrs

    # ------------------------------------------------------------------ peers' evictions

    def receive_records(self, records: Sequence[bytes]) -> None:
        """A run of a peer's evictions: the records are the data plane's keys already."""
        self.counts["received"] += len(records)
        self._queue(records)

    def receive(self, t: FlowTuple) -> None:
        """One eviction of a peer, applied with the others of the same loop turn."""
        self.counts["received"] += 1
        try:
            key = L.flow_key_bytes(t.client, t.client_port, t.vip, t.vip_port, t.proto)
        except (ValueError, TypeError):
            self.counts["malformed"] += 1
            return
        self._queue((key,))

    def _queue(self, keys: Iterable[bytes]) -> None:
        if not self._received:
            asyncio.get_running_loop().call_soon(self.apply_received)
        self._received.extend(keys)

    def apply_received(self) -> None:
        """Each key is read by its destination: a VIP (the forward entry a mix holds
        for the flow) or a backend endpoint (a nat flow named as its backend saw it)."""
        keys, self._received = self._received, []
        if keys:
            self.counts["applied"] += sum(1 for r, _ in self.balancer.evict_many(keys) if r)

    # ------------------------------------------------------------------ marks

    def save_marks(self) -> None:
        try:
            self.marks.save((e.origin, e.epoch, e.contiguous) for e in self.driver.eviction_marks())
        except (BpfError, OSError, ValueError) as exc:
            self.counts["marks_save_failed"] += 1
            log.warning("cannot save eviction marks: %s", exc)

    async def save_marks_loop(self) -> None:
        # A mark saved late only makes a restarted agent ask for a few evictions it
        # already applied (harmless); a mark ahead of what was applied would lose some,
        # and cannot happen: marks are read after the evictions were applied.
        while True:
            await asyncio.sleep(MARKS_SAVE_INTERVAL_S)
            self.save_marks()

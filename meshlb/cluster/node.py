"""One cluster member: the SWIM engine (swim.py) with its payloads plugged in as its
delegate: eviction dissemination (eviction_gossip.py) and the drain map
(drain_gossip.py). This is what the driver, the simulator and the benches run; sans-IO
like its parts.

The owner feeds it datagrams (``handle_datagram``) and time (``tick`` at
``next_deadline()``), drains ``take_outgoing()`` / ``take_events()``, publishes
evictions (``publish_eviction_records``, ``publish_evictions``, ``publish_eviction``)
and writes the drain map (``set_drain``).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from .delegate import GROUP, Address, Delegates
from .drain_gossip import DrainGossip, DrainsChanged
from .eviction_gossip import EvictionEvent, EvictionGossip, EvictionReceived, EvictionsReceived
from .membership import MemberView
from .messages import PROTOCOL_VERSION, DigestEntry, DrainEntry, FlowTuple, MemberMeta, Status
from .protocol_config import ProtocolConfig
from .swim import (
    GossipWire,
    MemberDead,
    MemberLeft,
    MemberSuspect,
    MemberUp,
    MetaChanged,
    Outgoing,
    SwimNode,
)

__all__ = [
    "Node", "GROUP", "Outgoing", "FlowTuple", "MemberMeta", "Status", "MemberView", "PROTOCOL_VERSION",
    "MemberUp", "MemberSuspect", "MemberDead", "MemberLeft", "MetaChanged", "EvictionReceived", "EvictionsReceived",
    "DrainsChanged", "DrainEntry", "Event",
]

Event = (MemberUp | MemberSuspect | MemberDead | MemberLeft | MetaChanged | EvictionReceived | EvictionsReceived
         | DrainsChanged)


class Node(SwimNode[EvictionEvent | DrainsChanged]):
    def __init__(self, *, name: str, address: Address, wire: GossipWire, config: ProtocolConfig,
                 rng: random.Random, now: float, meta: MemberMeta | None = None, incarnation: int = 0,
                 peers: Sequence[Address] = (), group: bool = False) -> None:
        # Evictions are numbered within the epoch of the incarnation the member starts
        # with, so a restarted member's numbers cannot be taken for duplicates.
        self.evictions = EvictionGossip(name=name, epoch=incarnation, config=config)
        self.drains = DrainGossip(name=name, config=config)
        super().__init__(name=name, address=address, wire=wire, config=config, rng=rng, now=now, meta=meta,
                         incarnation=incarnation, peers=peers, group=group,
                         delegate=Delegates(self.evictions, self.drains))

    def publish_eviction(self, key: FlowTuple, now: float) -> int:
        """Queue an eviction of ``key`` for every member; returns its number."""
        return self.evictions.publish(key, now)

    def publish_evictions(self, keys: Iterable[FlowTuple], now: float) -> int:
        """:meth:`publish_eviction` for each of ``keys``; one the node refuses (not
        TCP/UDP, a port out of range, not an address) is counted and skipped, so one
        bad record cannot drop the batch it came in. Returns the number of the last
        eviction published (0: none)."""
        return self.evictions.publish_many(keys, now)

    def publish_eviction_records(self, records: Iterable[bytes], now: float) -> int:
        """Queue evictions of flows given as flow records (:func:`flow_record`, the data
        plane's keys), in runs of up to :data:`MAX_RUN` per message while every live
        member takes runs, one message each otherwise. A record that is not one is
        counted and skipped. Returns the number of the last eviction published (0: none)."""
        return self.evictions.publish_records(records, now)

    def evictions_sent_through(self) -> int:
        """The number of this member's own evictions up to which every one has gone
        out in at least one datagram, or will never go (dropped from a full queue),
        or has nobody to go to (a joined member alone). A reader of socket closes
        keeps each close it acted on until this passes the eviction it published, so
        a close is never lost with a process killed before telling its peers."""
        return self.evictions.sent_through()

    def eviction_marks(self) -> list[DigestEntry]:
        """Per other origin, the eviction number up to which every eviction was seen.
        An agent saves these beside its conntrack state and hands them to
        :meth:`restore_eviction_marks` after a restart."""
        return self.evictions.marks()

    def restore_eviction_marks(self, entries: Iterable[DigestEntry], now: float) -> None:
        """Before :meth:`join`: resume eviction numbering where the previous run of this
        member stopped, so the join asks for exactly the evictions published while it
        was down (instead of taking the seed's marks and missing them)."""
        self.evictions.restore_marks(entries, now)

    def set_drain(self, key: str, drained: bool, wall_ms: int, now: float) -> DrainEntry:
        """Drain (or undrain) ``key`` in the cluster's drain map and gossip it;
        ``wall_ms`` is this host's wall clock in milliseconds."""
        return self.drains.set(key, drained, wall_ms, now)

    def drained(self) -> frozenset[str]:
        """The keys the drain map holds drained."""
        return self.drains.drained()

    def drain_entries(self) -> list[DrainEntry]:
        """The whole drain map (what an agent saves across restarts)."""
        return self.drains.entries()

    def restore_drains(self, entries: Iterable[DrainEntry]) -> int:
        """Before :meth:`join`: the drain map a previous run of this member saved."""
        return self.drains.restore(entries)

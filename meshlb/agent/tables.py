"""Table sync: the data plane's VIPs and Maglev tables kept equal to the cluster's view.

Whenever membership, metadata, health or the drain map changes, every VIP's backends
(meshlb.backends) and table (meshlb.forwarding) are planned again and the changed ones
are swapped in. Backends are numbered locally: (name, address, port) -> id. An id stays
bound to its backend until the backend is forgotten (a member reaped, a server gone from
the file), so flows that conntrack pins to a member that turned suspect, or to a backend
that drains, keep flowing while only new flows move. After a restart the pinned maps
still hold the previous agent's VIP and backend ids, which conntrack entries point at: a
VIP or backend takes back the id that holds it, and new ids avoid the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from meshlb import backends, forwarding, maglev
from meshlb.cluster.membership import MemberView
from meshlb.config import VipConfig
from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import NO_BACKEND, Balancer, vip_key

log = logging.getLogger(__name__)

REBUILD_DEBOUNCE_S = 0.02


class ClusterView(Protocol):
    """What table sync reads of the cluster (the gossip driver is one)."""

    def members(self) -> list[MemberView]: ...

    def drained(self) -> Collection[str]:
        """The keys the cluster's drain map holds drained (meshlb.backends.drain_key)."""
        ...


class IdAllocator:
    """Ids 0..size-1, the lowest free one first. An id is in use from allocate() or
    claim() until release()."""

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what
        self._used: set[int] = set()

    def claim(self, i: int) -> None:
        """Mark an id taken by someone else (the pinned state of a previous agent)."""
        if not 0 <= i < self.size:
            raise ValueError(f"{self.what} id {i} outside 0..{self.size - 1}")
        self._used.add(i)

    def allocate(self) -> int:
        for i in range(self.size):
            if i not in self._used:
                self._used.add(i)
                return i
        raise RuntimeError(f"no free {self.what} id: all {self.size} are in use")

    def release(self, i: int) -> None:
        self._used.discard(i)

    def __contains__(self, i: object) -> bool:
        return i in self._used


def _dataplane_shape(v: VipConfig) -> tuple[str, int, int]:
    """What of a VIP the balancer holds: a reload that changes only the rest (its SNAT
    settings, applied at start) leaves the VIP and its flows in place."""
    return (v.mode, v.ring_size, v.target_port)


class TableSync:
    """The balancer's VIPs (``set_vips``) and their tables (``rebuild``, or
    ``schedule`` to coalesce a burst of changes into one rebuild)."""

    def __init__(self, balancer: Balancer, name: str, cluster: ClusterView, *,
                 on_digest: Callable[[], None] = lambda: None) -> None:
        self.balancer = balancer
        self.name = name  # this node's member name: its backends are local
        self.cluster = cluster
        self.on_digest = on_digest  # the digest of all tables changed
        self.serving = True  # False while draining: no VIP has backends
        self.vips: tuple[VipConfig, ...] = ()
        self.vip_ids: dict[str, int] = {}
        self.backend_ids: dict[tuple[str, str, int], int] = {}
        self.local_ids: set[int] = set()  # ids of this node's own backends
        self.external_ids: set[int] = set()  # ids of real servers (no tracer reports their closes)
        self.sets: dict[str, backends.BackendSet] = {}
        self.plans: dict[str, forwarding.VipPlan[VipConfig]] = {}
        self.digest = ""
        self.table_changes = 0
        self._vip_alloc = IdAllocator(L.MLB_MAX_VIPS, "VIP")
        self._backend_alloc = IdAllocator(L.MLB_MAX_BACKENDS, "backend")
        # what the pinned maps hold from a previous agent: key -> id, until taken back
        self._pinned_vips = {bytes(k): m.vip_id for k, m in balancer.vips()}
        self._pinned_backends = {(str(L.words_addr(b.addr, b.family)), L.port_host(b.port)): bid
                                 for bid, b in balancer.backends_in_use()}
        for i in self._pinned_vips.values():
            self._vip_alloc.claim(i)
        for i in self._pinned_backends.values():
            self._backend_alloc.claim(i)
        self._lock = asyncio.Lock()
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ VIPs

    def set_vips(self, vips: Sequence[VipConfig]) -> tuple[list[VipConfig], list[VipConfig]]:
        """Make the balancer's VIPs these. A VIP gone, or changed in what the balancer
        holds of it, is removed (its flows end); a new or changed one is added with no
        table yet (the next rebuild plans it). Returns (removed, added)."""
        new = {v.key: v for v in vips}
        removed = [v for v in self.vips if v.key not in new or _dataplane_shape(new[v.key]) != _dataplane_shape(v)]
        for v in removed:
            self.balancer.remove_vip(v.address, v.port, v.protocol)
            self._vip_alloc.release(self.vip_ids.pop(v.key))
            self.plans.pop(v.key, None)
        self.vips = tuple(vips)
        added = [v for v in self.vips if v.key not in self.vip_ids]
        for v in added:
            vip_id = self._pinned_vips.pop(bytes(vip_key(v.address, v.port, v.protocol)), None)
            if vip_id is None:
                vip_id = self._vip_alloc.allocate()
            self.vip_ids[v.key] = vip_id
            self.balancer.add_vip(v.address, v.port, v.protocol, v.mode, vip_id=vip_id, ring_size=v.ring_size)
        return removed, added

    # ------------------------------------------------------------------ rebuilds

    def schedule(self) -> None:
        """Coalesce bursts of membership events into one rebuild."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(REBUILD_DEBOUNCE_S, self._spawn)

    def _spawn(self) -> None:
        self._handle = None
        task = asyncio.get_running_loop().create_task(self.rebuild(), name="rebuild")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("table rebuild failed: %r", task.exception())

    async def stop(self) -> None:
        """Cancel a scheduled rebuild and any running one."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t

    async def rebuild(self) -> None:
        """Make the data plane's tables equal to the cluster's view.

        Planning and id assignment run on the loop; the kernel writes (tens of
        milliseconds per distinct table) run in a worker thread so gossip and probes go
        on meanwhile. One rebuild at a time; a view that changes during one is planned
        again from scratch by the next."""
        async with self._lock:
            members = self.cluster.members()
            sets = backends.backend_sets(self.vips, members, self.cluster.drained(), serving=self.serving)
            plans = forwarding.plan(self.vips, {k: s.chosen() for k, s in sets.items()})
            changed = [k for k, p in plans.items() if self.plans.get(k) is None or self.plans[k].digest != p.digest]
            tables = self._tables_for(plans, changed, sets)
            if tables:
                await asyncio.to_thread(self.balancer.set_vip_tables, tables)
            self._forget_gone_backends({m.name for m in members}, sets)
            self.sets = sets
            self.plans = plans
            digest = forwarding.plans_digest(plans)
            if changed:
                self.table_changes += 1
                log.info("tables: %s -> %s (%s)", self.digest or "-", digest,
                         ", ".join(f"{k}: {_shown(plans[k], sets[k])}" for k in changed))
            if digest != self.digest:
                self.digest = digest
                self.on_digest()

    def _tables_for(self, plans: dict[str, forwarding.VipPlan[VipConfig]], changed: list[str],
                    sets: dict[str, backends.BackendSet]) -> dict[int, list[int]]:
        """Backend-id tables of the changed VIPs. VIPs whose plans share a table and map
        to the same backend ids share one list object (the data plane then fills one
        array for all of them)."""
        out: dict[int, list[int]] = {}
        translated: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for key in changed:
            plan = plans[key]
            vip = plan.vip
            ids = []
            for name in plan.backends:
                b = sets[key].get(name)
                assert b is not None  # the plan is built from the set
                bid = self.backend_id(name, b.address, b.port, external=b.kind == backends.EXTERNAL)
                self.balancer.set_backend(bid, b.address, b.port, local=(name == self.name),
                                          external=b.kind == backends.EXTERNAL)
                ids.append(bid)
            cache_key = (id(plan.table), tuple(ids))
            table = translated.get(cache_key)
            if table is None:
                # Maglev fills every slot or, when every backend has weight 0, none
                filled = bool(ids) and plan.table[0] != maglev.NO_BACKEND
                table = [ids[i] for i in plan.table] if filled else [NO_BACKEND] * vip.ring_size
                translated[cache_key] = table
            out[self.vip_ids[vip.key]] = table
        return out

    def backend_id(self, name: str, addr: str, port: int, *, external: bool = False) -> int:
        """The backend's data-plane id for one address and nat port: the one it has,
        else the one the pinned backends give its address and port, else a new one, so
        no established flow is silently handed to another backend."""
        key = (name, addr, port)
        bid = self.backend_ids.get(key)
        if bid is not None:
            return bid
        bid = self._pinned_backends.pop((addr, port), None)
        if bid is None:
            bid = self._backend_alloc.allocate()
        self.backend_ids[key] = bid
        if name == self.name:
            self.local_ids.add(bid)
        if external:
            self.external_ids.add(bid)
        return bid

    def _forget_gone_backends(self, members: set[str], sets: dict[str, backends.BackendSet]) -> None:
        """A backend id is released only when its backend is gone: a member from the
        member list (reaped), a server from every VIP of the file. While a member is
        suspect or dead, or a backend drains, the id keeps pointing at it so established
        flows are not silently moved to another backend."""
        servers = {b.name for s in sets.values() for b in s.backends if b.kind == backends.EXTERNAL}
        for key, bid in list(self.backend_ids.items()):
            if key[0] not in members and key[0] not in servers:
                self.balancer.remove_backend(bid)
                del self.backend_ids[key]
                self.local_ids.discard(bid)
                self.external_ids.discard(bid)
                self._backend_alloc.release(bid)

    def backend_names(self) -> dict[int, str]:
        """backend id -> backend name (member name or server "address:port")."""
        return {bid: key[0] for key, bid in self.backend_ids.items()}


def _shown(plan: forwarding.VipPlan[VipConfig], bset: backends.BackendSet) -> str:
    """The table's backends for the log: draining ones marked."""
    out = []
    for name in plan.backends:
        b = bset.get(name)
        out.append(f"{name}(draining)" if b is not None and b.state == backends.DRAINING else name)
    return ",".join(out) or "none"

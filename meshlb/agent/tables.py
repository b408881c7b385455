"""Table sync: the data plane's VIPs and Maglev tables kept equal to the cluster's view.

Whenever membership, metadata or health changes, every VIP's table is planned again
(meshlb.forwarding) and the changed ones are swapped in. Backends are numbered locally:
(member, address, port) -> id. An id stays bound to its member until the member is
forgotten (reaped), so flows that conntrack pins to a member that turned suspect keep
flowing while only new flows move. After a restart the pinned maps still hold the
previous agent's VIP and backend ids, which conntrack entries point at: a VIP or member
takes back the id that holds it, and new ids avoid the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from meshlb import forwarding
from meshlb.cluster.membership import MemberView
from meshlb.config import VipConfig
from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import NO_BACKEND, Balancer, vip_key

log = logging.getLogger(__name__)

REBUILD_DEBOUNCE_S = 0.02


class ClusterView(Protocol):
    """What table sync reads of the cluster (the gossip driver is one)."""

    def members(self) -> list[MemberView]: ...

    def usable_backends(self) -> list[str]: ...


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


def member_address(m: MemberView, v6: bool) -> str | None:
    """The member's data-plane address of one family: its gossip address, or one of
    the addresses its metadata lists."""
    for addr in (m.address[0], *m.meta.addresses):
        if (":" in addr) == v6 and not addr.lower().startswith("fe80"):
            return addr
    return None


def serving_members(members: Iterable[MemberView]) -> dict[str, tuple[tuple[str, ...], int]]:
    """member name -> (VIP keys it can back, weight). A member backs a VIP only if it has
    an address of the VIP's family (keys are "addr:port/proto", IPv6 "[addr]:port/proto")."""
    return {
        m.name: (tuple(v for v in m.meta.vips if member_address(m, v.startswith("[")) is not None), m.meta.weight)
        for m in members
    }


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
            members = {m.name: m for m in self.cluster.members()}
            usable = self.cluster.usable_backends() if self.serving else []
            plans = forwarding.plan(self.vips, usable, serving_members(members.values()))
            changed = [k for k, p in plans.items() if self.plans.get(k) is None or self.plans[k].digest != p.digest]
            tables = self._tables_for(plans, changed, members)
            if tables:
                await asyncio.to_thread(self.balancer.set_vip_tables, tables)
            self._forget_gone_backends(members)
            self.plans = plans
            digest = forwarding.plans_digest(plans)
            if changed:
                self.table_changes += 1
                log.info("tables: %s -> %s (%s)", self.digest or "-", digest,
                         ", ".join(f"{k}: {','.join(plans[k].backends) or 'none'}" for k in changed))
            if digest != self.digest:
                self.digest = digest
                self.on_digest()

    def _tables_for(self, plans: dict[str, forwarding.VipPlan[VipConfig]], changed: list[str],
                    members: dict[str, MemberView]) -> dict[int, list[int]]:
        """Backend-id tables of the changed VIPs. VIPs whose plans share a table and map
        to the same backend ids share one list object (the data plane then fills one
        array for all of them)."""
        out: dict[int, list[int]] = {}
        translated: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for key in changed:
            plan = plans[key]
            vip = plan.vip
            port = vip.target_port if vip.mode == "nat" else 0
            ids = []
            for name in plan.backends:
                addr = member_address(members[name], vip.address.version == 6)
                assert addr is not None  # serving_members lists only members with one
                bid = self.backend_id(name, addr, port)
                self.balancer.set_backend(bid, addr, port, local=(name == self.name))
                ids.append(bid)
            cache_key = (id(plan.table), tuple(ids))
            table = translated.get(cache_key)
            if table is None:
                table = [ids[i] for i in plan.table] if ids else [NO_BACKEND] * vip.ring_size
                translated[cache_key] = table
            out[self.vip_ids[vip.key]] = table
        return out

    def backend_id(self, name: str, addr: str, port: int) -> int:
        """The member's data-plane id for one address family and nat port: the one it
        has, else the one the pinned backends give its address and port, else a new
        one, so no established flow is silently handed to another backend."""
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
        return bid

    def _forget_gone_backends(self, members: dict[str, MemberView]) -> None:
        """A backend id is released only when its member is gone from the member list
        (reaped); while it is suspect or dead the id keeps pointing at it so established
        flows are not silently moved to another backend."""
        for key, bid in list(self.backend_ids.items()):
            if key[0] not in members:
                self.balancer.remove_backend(bid)
                del self.backend_ids[key]
                self.local_ids.discard(bid)
                self._backend_alloc.release(bid)

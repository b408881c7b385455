"""The asyncio loop that drives a sans-IO :class:`meshlb.cluster.node.Node`.

The node owns the protocol and no I/O; the :class:`UdpTransport` owns sockets and no
protocol. This module is the only place where the two meet and where time comes from:
``now`` is always ``loop.time()``, so the node sees the loop's monotonic clock.

One task does everything, in this order, each time it wakes up:

1. hand every queued datagram to ``node.handle_datagram``,
2. call ``node.tick`` if its deadline has come,
3. send what the node wants sent and deliver its events,
4. sleep until ``node.next_deadline()`` or until the transport queues a datagram,
   whichever comes first (a timer handle and a future, no polling).

Public calls that change the node (``publish_eviction``, ``update_meta``) run the
node at once, flush its datagrams and wake the task, because they may have moved the
deadline. Nothing the node or a callback raises stops the task: it is logged and
counted, since a dead gossip loop would silently turn this member into a crashed one
in everyone else's eyes.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

from .membership import MemberView
from .messages import DigestEntry, DrainEntry, FlowTuple, MemberMeta, Status
from .node import Event, Node
from .protocol_config import ProtocolConfig
from .swim import GossipWire
from .transport import DEFAULT_PORT, TransportConfig, UdpTransport, resolve_peers

__all__ = ["GossipDriver", "DriverError"]

log = logging.getLogger(__name__)

# Datagrams handled per wake-up before the task yields to the loop, so a flood cannot
# starve timers and other tasks (the transport's queue bounds what waits meanwhile).
_BATCH = 256
# Timers of the loop may fire a hair early (uvloop counts in milliseconds).
_EPSILON = 0.001
# Floor on the sleep when the node reports a deadline already past after a tick: a
# protocol bug then costs a wake-up per millisecond, not a core.
_MIN_SLEEP = 0.001


_T = TypeVar("_T")


class DriverError(RuntimeError):
    pass


class GossipDriver:
    """Runs one member of the cluster on the current event loop.

    ``transport`` is a :class:`TransportConfig` (the driver builds the transport) or a
    ready, unopened :class:`UdpTransport`. ``peers`` are seed specs (``host``,
    ``host:port``, ``[v6]:port`` or (host, port) tuples); names are resolved at start
    and again every ``resolve_retry`` seconds while some do not resolve or while this
    member knows no other member.

    Events reach ``on_event`` (a plain function or a coroutine function) and, if
    ``event_queue`` > 0, the ``events()`` async iterator; when that queue is full the
    oldest event is dropped and counted.
    """

    def __init__(
        self,
        *,
        name: str,
        wire: GossipWire,
        protocol: ProtocolConfig,
        transport: TransportConfig | UdpTransport,
        peers: Iterable[str | tuple[str, int]] = (),
        meta: MemberMeta | None = None,
        incarnation: int = 0,
        rng: random.Random | None = None,
        on_event: Callable[[Event], object] | None = None,
        event_queue: int = 1024,
        resolve_retry: float = 5.0,
        leave_linger: float | None = None,
        node_factory: Callable[..., Node] | None = None,
        eviction_marks: Iterable[DigestEntry] = (),
        drains: Iterable[DrainEntry] = (),
    ) -> None:
        self.name = name
        self.wire = wire
        self.protocol = protocol
        if isinstance(transport, UdpTransport):
            self.transport = transport
        else:
            self.transport = UdpTransport(transport)
        self.transport.on_datagram = self._wake
        self._peer_specs = list(peers)
        self._meta = meta
        self._incarnation = incarnation
        self._rng = rng or random.Random()
        self.on_event = on_event
        # called after each batch of datagrams handed to the transport (see
        # evictions_sent_through)
        self.on_sent: Callable[[], None] | None = None
        self._event_queue: asyncio.Queue[Event | None] | None = None
        self._event_queue_size = event_queue
        self.resolve_retry = resolve_retry
        self.leave_linger = leave_linger
        self._node_factory: Callable[..., Node] = node_factory or Node
        # marks of a previous run of this member (see Node.restore_eviction_marks)
        self._eviction_marks = tuple(eviction_marks)
        # the drain map a previous run of this member saved (see Node.restore_drains)
        self._drains = tuple(drains)

        self.node: Node | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = math.inf
        self._stopping = False
        self._stopped = False
        self._seeds: list[tuple[str, int]] = []
        self._unresolved: list[str] = []
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self.counters: collections.Counter[str] = collections.Counter()

    # -- lifecycle ------------------------------------------------------------------------
    def now(self) -> float:
        """The clock the node runs on (the loop's)."""
        loop = self._loop or asyncio.get_event_loop()
        return loop.time()

    @property
    def address(self) -> tuple[str, int]:
        return self.transport.address

    @property
    def joined(self) -> bool:
        """The join was answered (or there was nobody to ask): members() is the cluster."""
        return self.node is not None and bool(self.node.joined)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Open the sockets, build the node, join, and start the loop task."""
        if self._loop is not None:
            raise DriverError("driver already started")
        loop = self._loop = asyncio.get_running_loop()
        if self._event_queue_size > 0:
            self._event_queue = asyncio.Queue(self._event_queue_size)
        await self.transport.open()
        try:
            self._seeds, self._unresolved = await self._resolve()
            now = loop.time()
            self.node = node = self._node_factory(
                name=self.name, address=self.transport.address, wire=self.wire,
                config=self.protocol, rng=self._rng, now=now, meta=self._meta,
                incarnation=self._incarnation, peers=tuple(self._seeds),
                group=self.transport.has_group,
            )
            if self._eviction_marks:
                node.restore_eviction_marks(self._eviction_marks, now)
            if self._drains:
                node.restore_drains(self._drains)
            node.join(now)
            self._pump()
        except BaseException:
            self.transport.close()
            raise
        self._task = loop.create_task(self._run(), name=f"gossip:{self.name}")
        if self._peer_specs and self.resolve_retry > 0:
            self._resolver = loop.create_task(self._resolve_loop(), name=f"gossip-resolve:{self.name}")

    async def stop(self, leave: bool = True, timeout: float = 3.0) -> None:
        """Stop the member. With ``leave``, announce the departure first and keep
        answering until the announcement has had time to spread (``leave_linger``,
        default about the node's own retransmission time, capped by ``timeout``)."""
        if self._stopped or self._loop is None:
            return
        loop = self._loop
        if leave and self.node is not None and self.running:
            self._call(lambda node, now: node.leave(now))
            linger = self._linger_time()
            end = loop.time() + min(timeout, linger)
            while loop.time() < end and self.running:
                if self._leave_spread():
                    break
                await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
        await self._shutdown()

    def abort(self) -> None:
        """Stop at once, without a goodbye: to the cluster this member has crashed."""
        if self._stopped:
            return
        self._stopping = self._stopped = True
        for t in (self._task, self._resolver):
            if t is not None:
                t.cancel()
        self.transport.close()
        self._close_events()

    async def _shutdown(self) -> None:
        self._stopping = True
        self._wake()
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        # Datagrams the node produced on the way out (its leave, last acks) were
        # handed to the kernel synchronously by _pump; closing does not discard them.
        self.transport.close()
        self._stopped = True
        self._close_events()

    def _close_events(self) -> None:
        q = self._event_queue
        if q is None:
            return
        while True:
            try:
                q.put_nowait(None)  # the end
                return
            except asyncio.QueueFull:
                q.get_nowait()
                self.counters["events_dropped"] += 1

    def _linger_time(self) -> float:
        if self.leave_linger is not None:
            return self.leave_linger
        p = self.protocol
        # The goodbye is piggybacked about retransmit_mult*log10(N) times, one batch
        # per gossip interval; add a probe timeout for the acks of the last ones.
        try:
            from .protocol_config import retransmit_limit

            n = max(2, len(self._members_safe()))
            return retransmit_limit(p.retransmit_mult, n) * p.gossip_interval + p.probe_timeout
        except Exception:
            return 1.0

    def _leave_spread(self) -> bool:
        # The node sends its goodbye directly at leave(); once its broadcast queue is
        # empty the goodbye has also had all its gossip retransmissions, and staying
        # longer only delays the exit.
        try:
            return self.node is not None and self.node.stats.get("broadcast_queue", 1) == 0
        except Exception:
            return False

    # -- the loop -------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stopping:
            try:
                self._step(loop.time())
            except Exception:
                # _step guards each node call; this is a bug of the driver itself.
                self.counters["driver_errors"] += 1
                log.exception("gossip driver step failed")
            if self._stopping:
                break
            if self.transport.pending():
                await asyncio.sleep(0)  # more datagrams: let others run, then go on
                continue
            await self._sleep_until(self._deadline)

    def _step(self, now: float) -> None:
        node = self.node
        assert node is not None
        for data, source in self.transport.take(_BATCH):
            try:
                node.handle_datagram(now, data, source)
            except Exception:
                self.counters["node_errors"] += 1
                log.exception("node failed on a datagram from %s", source)
        if now + _EPSILON >= self._deadline:
            self.counters["ticks"] += 1
            try:
                node.tick(now)
            except Exception:
                self.counters["node_errors"] += 1
                log.exception("node tick failed")
        self._pump()

    async def _sleep_until(self, deadline: float) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if deadline <= now:
            deadline = now + _MIN_SLEEP
        self._waiter = fut = loop.create_future()
        handle = loop.call_at(deadline, self._wake) if math.isfinite(deadline) else None
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()
        self.counters["wakeups"] += 1

    def _pump(self) -> None:
        """Send the node's datagrams, deliver its events, refresh its deadline."""
        node = self.node
        assert node is not None
        try:
            out = node.take_outgoing()
        except Exception:
            self.counters["node_errors"] += 1
            log.exception("node take_outgoing failed")
            out = []
        tr = self.transport
        for o in out:
            if isinstance(o.dest, tuple):
                tr.send(o.data, o.dest)
            else:  # GROUP
                tr.send_group(o.data)
        if out and self.on_sent is not None:
            try:
                self.on_sent()
            except Exception:
                self.counters["callback_errors"] += 1
                log.exception("on_sent callback failed")
        events: list[Event]
        try:
            events = node.take_events()
        except Exception:
            self.counters["node_errors"] += 1
            log.exception("node take_events failed")
            events = []
        for ev in events:
            self._deliver(ev)
        try:
            self._deadline = node.next_deadline()
        except Exception:
            self.counters["node_errors"] += 1
            log.exception("node next_deadline failed")
            self._deadline = (self._loop.time() if self._loop else 0.0) + 1.0

    def _deliver(self, ev: Event) -> None:
        self.counters["events"] += 1
        cb = self.on_event
        if cb is not None:
            try:
                res = cb(ev)
                if res is not None and inspect.isawaitable(res):
                    task = asyncio.ensure_future(res)
                    self._callback_tasks.add(task)
                    task.add_done_callback(self._callback_done)
            except Exception:
                self.counters["callback_errors"] += 1
                log.exception("event callback failed on %r", ev)
        q = self._event_queue
        if q is not None:
            if q.full():
                # The oldest event is the least useful one: membership events carry
                # the member's whole current view, so later ones supersede it.
                q.get_nowait()
                self.counters["events_dropped"] += 1
            q.put_nowait(ev)

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters["callback_errors"] += 1
            log.error("event callback failed", exc_info=task.exception())

    def _call(self, op: Callable[[Node, float], _T]) -> _T:
        """Run a node operation now and flush what it produced."""
        if self.node is None or self._stopped:
            raise DriverError("driver is not running")
        loop = self._loop
        assert loop is not None
        res = op(self.node, loop.time())
        self._pump()
        self._wake()
        return res

    # -- seeds ----------------------------------------------------------------------------
    async def _resolve(self) -> tuple[list[tuple[str, int]], list[str]]:
        port = self.transport.config.port or DEFAULT_PORT
        return await resolve_peers(self._peer_specs, port, self.transport.family)

    def _alone(self) -> bool:
        try:
            return all(m.name == self.name for m in self._members_safe()
                       if m.status in (Status.ALIVE, Status.SUSPECT))
        except Exception:
            return False

    def _members_safe(self) -> list[MemberView]:
        try:
            return list(self.node.members()) if self.node is not None else []
        except Exception:
            return []

    async def _resolve_loop(self) -> None:
        """Retry names that did not resolve, and re-resolve everything while alone:
        a seed's address may have changed (DHCP, a rescheduled container)."""
        delay = self.resolve_retry
        while not self._stopping:
            await asyncio.sleep(delay)
            if not self._unresolved and not self._alone():
                delay = self.resolve_retry
                continue
            try:
                seeds, unresolved = await self._resolve()
            except Exception:
                log.exception("resolving peers failed")
                continue
            new = [a for a in seeds if a not in self._seeds]
            self._unresolved = unresolved
            if new:
                # Known seeds need nothing: the node retries its join to them itself.
                self._seeds.extend(new)
                self._add_seeds(new)
            # Back off while nothing changes, up to a minute.
            delay = self.resolve_retry if new else min(60.0, delay * 2)

    def _add_seeds(self, seeds: Sequence[tuple[str, int]]) -> None:
        node, loop = self.node, self._loop
        if node is None or loop is None or self._stopped or not seeds:
            return
        try:
            node.add_peers(tuple(seeds), loop.time())
        except Exception:
            self.counters["node_errors"] += 1
            log.exception("node refused new seeds")
            return
        self._pump()
        self._wake()

    # -- public API -----------------------------------------------------------------------
    def publish_eviction(self, flow: FlowTuple) -> int:
        """Tell the cluster that ``flow`` must be evicted everywhere; returns the
        eviction's number (see :meth:`evictions_sent_through`)."""
        return self._call(lambda node, now: node.publish_eviction(flow, now))

    def publish_evictions(self, flows: Sequence[FlowTuple]) -> int:
        """:meth:`publish_eviction` for many flows at once (a batch of socket closes):
        one flush of the node afterwards instead of one per flow (see
        :meth:`Node.publish_evictions`)."""
        return self._call(lambda node, now: node.publish_evictions(flows, now))

    def publish_eviction_records(self, records: Sequence[bytes]) -> int:
        """:meth:`Node.publish_eviction_records` (flows as the data plane keys them, in
        runs), one flush of the node afterwards."""
        return self._call(lambda node, now: node.publish_eviction_records(records, now))

    def evictions_sent_through(self) -> int:
        """Own evictions up to this number have left in a datagram (or never will)."""
        if self.node is None:
            return 0
        return self.node.evictions_sent_through()

    def update_meta(self, meta: MemberMeta) -> None:
        self._call(lambda node, now: node.update_meta(meta, now))

    def eviction_marks(self) -> list[DigestEntry]:
        """Per origin, up to which eviction everything was received."""
        if self.node is None:
            return []
        return self.node.eviction_marks()

    def members(self) -> list[MemberView]:
        if self.node is None:
            return []
        return list(self.node.members())

    def set_drain(self, key: str, drained: bool, wall_ms: int) -> DrainEntry:
        """Drain or undrain ``key`` cluster-wide (see :meth:`Node.set_drain`)."""
        return self._call(lambda node, now: node.set_drain(key, drained, wall_ms, now))

    def drained(self) -> frozenset[str]:
        """The keys the cluster's drain map holds drained (restored ones before start)."""
        if self.node is None:
            return frozenset(e.key for e in self._drains if e.drained)
        return self.node.drained()

    def drain_entries(self) -> list[DrainEntry]:
        if self.node is None:
            return list(self._drains)
        return self.node.drain_entries()

    def usable_backends(self) -> list[str]:
        if self.node is None:
            return []
        return list(self.node.usable_backends())

    async def events(self) -> AsyncIterator[Event]:
        """The node's events, in order, until the driver stops."""
        q = self._event_queue
        if q is None:
            raise DriverError("events() needs event_queue > 0")
        while True:
            ev = await q.get()
            if ev is None:
                return
            yield ev

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"transport": self.transport.stats.as_dict(), "driver": dict(self.counters)}
        if self.node is not None:
            try:
                out["node"] = _plain(self.node.stats)  # includes the Wire's drops
            except Exception:
                log.exception("node stats failed")
        return out


def _plain(obj: Any) -> Any:
    """A node's stats object as plain data, whatever its shape."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)

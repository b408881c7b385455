"""The composition root of one mix's agent (`meshlb join`).

It opens the data-plane session, builds the gossip driver, table sync, the eviction
pump, health checks and the operator endpoints, wires their callbacks, and owns the
loop: start order, signals, reload, and the two ways to end. A leave drains, tells the
cluster and unpins everything; any other end keeps the pinned state, so forwarding
carries on and the next agent adopts it. Its one job beyond wiring is to keep the data
plane equal to the cluster's view: a change of membership, metadata, health or the
cluster's drain map schedules a table rebuild.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from meshlb import config as config_mod
from meshlb.agent.drain_store import DrainStore
from meshlb.agent.established import count_established, served_endpoints
from meshlb.agent.evictions import EvictionPump
from meshlb.agent.expiry import ConntrackExpiry
from meshlb.agent.gossip import build_driver
from meshlb.agent.meta import health_targets, member_meta
from meshlb.agent.neighbours import solicit_unresolved, warm_neighbours
from meshlb.agent.operations import Operations
from meshlb.agent.session import Session
from meshlb.agent.tables import TableSync
from meshlb.cluster.driver import GossipDriver
from meshlb.cluster.messages import DigestEntry
from meshlb.cluster.node import (
    DrainsChanged,
    Event,
    MemberDead,
    MemberLeft,
    MemberMeta,
    MemberSuspect,
    MemberUp,
    MetaChanged,
)
from meshlb.health import HealthChecker
from meshlb.looplag import LoopLag

log = logging.getLogger(__name__)

MemberEvent = MemberUp | MemberSuspect | MemberDead | MemberLeft | MetaChanged
MEMBER_EVENTS = (MemberUp, MemberSuspect, MemberDead, MemberLeft, MetaChanged)
# the events that change which members the health checks cover (a member that starts or
# stops serving says so in its metadata)
ROSTER_EVENTS = (MemberUp, MemberDead, MemberLeft, MetaChanged)
DRAIN_POLL_S = 0.2


class Agent:
    driver: GossipDriver
    tables: TableSync
    pump: EvictionPump
    health: HealthChecker
    ops: Operations
    expiry: ConntrackExpiry

    def __init__(self, cfg: config_mod.Config, keys: tuple[bytes, ...], config_path: str | None = None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.config_path = config_path
        self.name = cfg.node.name
        self.started = time.time()
        self.draining = False
        self.session = Session(cfg)
        self.drain_store = DrainStore(cfg.node.state_dir)
        self.evictions: Counter[str] = Counter()
        self.health_checks: Counter[tuple[str, str]] = Counter()
        self.loop_lag = LoopLag()
        self._assembled = False
        self._handlers: dict[type, tuple[Callable[[Any], None], ...]] = {}
        self._stop = asyncio.Event()
        self._leave_requested = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        try:
            self.session.open()
            self._assemble()
            self.tables.set_vips(self.cfg.vips)
            self.session.serve(self.cfg.vips)
            await self.driver.start()
            self._update_health_targets()
            await self.health.start()
            await self.ops.start(self.cfg.node.control, self.cfg.node.metrics)
            self.pump.start()
            await self.tables.rebuild()
            self._spawn(warm_neighbours(self.driver, self.name, lambda: self.cfg.health.interval), "neighbours")
            if self.session.neighbour_link is None:
                self._spawn(solicit_unresolved(self.session.balancer), "unresolved-neighbours")
            self._spawn(self.pump.save_marks_loop(), "eviction-marks")
            self._spawn(self.expiry.run(), "conntrack-expiry")
            self._spawn(self.loop_lag.run(), "loop-lag")
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.request_leave)
            loop.add_signal_handler(signal.SIGINT, self.request_leave)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload(), "reload"))
            log.info(
                "%s: serving %d VIP(s) on %s (xdp %s%s), gossip on %s",
                self.name, len(self.cfg.vips), self.cfg.node.iface, self.session.xdp_mode,
                ", adopted pinned state" if self.session.adopted else "", self.cfg.node.bind,
            )
            await self._stop.wait()
            if self._leave_requested:
                await self._drain_and_leave()
            return 0
        finally:
            await self._shutdown()

    def _assemble(self) -> None:
        """The parts, built on the open session; nothing starts here."""
        s = self.session
        self.driver = build_driver(
            self.cfg, name=self.name, address=s.address, keys=self.keys, on_event=self._on_cluster_event,
            meta=member_meta(self.name, self.cfg.vips, "", s.data_addresses, draining=False, health=None,
                             serve=self.cfg.node.serve),
            event_queue=0, eviction_marks=[DigestEntry(o, e, m, ()) for o, (e, m) in s.restored_marks.items()],
            drains=self.drain_store.load())
        self.tables = TableSync(s.balancer, self.name, self.driver, on_digest=self._publish_meta)
        # the pump reads table sync's set of local backend ids as it changes
        self.pump = EvictionPump(s.balancer, s.tracer, self.driver, s.marks, counts=self.evictions,
                                 local_ids=self.tables.local_ids, vips=self.cfg.vips)
        self.expiry = ConntrackExpiry(s.balancer, lambda: self.cfg.conntrack, self.evictions,
                                      closing_backends=self.tables.external_ids)
        self.health = HealthChecker.from_config(self.cfg.health, on_change=self._on_health_change,
                                                on_result=self._on_health_result)
        self.ops = Operations(self, s, self.tables, self.driver, self.health, evictions=self.evictions,
                              health_checks=self.health_checks, loop_lag=self.loop_lag)
        handlers: dict[type, list[Callable[[Any], None]]] = {}
        for part in (self.pump.cluster_handlers(), dict.fromkeys(MEMBER_EVENTS, self._on_member_event),
                     dict.fromkeys(ROSTER_EVENTS, self._on_roster_event), {DrainsChanged: self._on_drains_changed}):
            for kind, handler in part.items():
                handlers.setdefault(kind, []).append(handler)
        self._handlers = {kind: tuple(hs) for kind, hs in handlers.items()}
        self._assembled = True

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_leave(self) -> None:
        if not self._leave_requested:
            log.info("leave requested: draining")
            self._leave_requested = True
            self._stop.set()

    async def _shutdown(self) -> None:
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        if self._assembled:
            await self.ops.stop()
            with contextlib.suppress(Exception):
                await self.health.stop()
            await self.tables.stop()
            self.pump.stop()
            if not self._leave_requested:
                # not a leave (an error): pinned state stays so forwarding carries on
                # and the next agent adopts it
                with contextlib.suppress(Exception):
                    await self.driver.stop(leave=False)
                self.pump.save_marks()
        self.session.close(unpin=self._leave_requested)

    async def _drain_and_leave(self) -> None:
        self.draining = True
        self._publish_meta()  # peers stop sending new flows here
        self.tables.serving = False
        await self.tables.rebuild()  # and so does this node's own balancer
        endpoints = served_endpoints(self.tables.vips, self.session.address)
        deadline = time.monotonic() + self.cfg.drain.timeout_s
        # polled: the kernel tells no one when the last connection of an endpoint ends
        while time.monotonic() < deadline and count_established(endpoints) > 0:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        left = count_established(endpoints)
        if left:
            log.warning("drain timeout: %d connection(s) still open", left)
        with contextlib.suppress(Exception):
            await self.driver.stop(leave=True)

    # ------------------------------------------------------------------ the cluster

    def _on_cluster_event(self, event: Event) -> None:
        for handler in self._handlers.get(type(event), ()):
            handler(event)

    def _on_member_event(self, event: MemberEvent) -> None:
        m = event.member
        if m.name != self.name:
            log.info("member %s: %s (incarnation %s)", m.name, type(event).__name__, m.incarnation)
        self.tables.schedule()

    def _on_roster_event(self, event: MemberEvent) -> None:
        if event.member.name != self.name:
            self._update_health_targets()

    def _on_drains_changed(self, event: DrainsChanged) -> None:
        log.info("drain map: %s", ", ".join(f"{k} {'drained' if k in self.driver.drained() else 'undrained'}"
                                             for k in event.keys))
        self.tables.schedule()
        try:
            self.drain_store.save(self.driver.drain_entries())
        except OSError as exc:
            log.error("cannot save the drain map to %s: %s", self.drain_store.path, exc)

    def _own_meta(self) -> MemberMeta:
        return member_meta(self.name, self.tables.vips, self.tables.digest, self.session.data_addresses,
                           draining=self.draining, health=self.health, serve=self.cfg.node.serve)

    def _publish_meta(self) -> None:
        if self.driver.running:
            self.driver.update_meta(self._own_meta())

    # ------------------------------------------------------------------ health

    def _update_health_targets(self) -> None:
        self.health.set_targets(health_targets(self.name, self.session.address, self.cfg.health,
                                               self.tables.vips, self.driver.members(), serve=self.cfg.node.serve))

    def _on_health_change(self, name: str, ok: bool) -> None:
        log.info("health: %s %s", name, "up" if ok else "DOWN")
        self._publish_meta()
        self.tables.schedule()

    def _on_health_result(self, name: str, ok: bool) -> None:
        self.health_checks[(name, "ok" if ok else "fail")] += 1

    # ------------------------------------------------------------------ reload

    async def reload(self) -> dict[str, Any]:
        if not self.config_path:
            log.warning("SIGHUP: no config file to reload (started without --config)")
            return {"applied": [], "needs_restart": [], "error": "no config file"}
        try:
            new = config_mod.load(self.config_path)
            new = config_mod.merge_cli(new, name=self.cfg.node.name, iface=self.cfg.node.iface,
                                       bind=None, control=None, peers=None)
            config_mod.validate_host(new)
        except config_mod.ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return {"applied": [], "needs_restart": [], "error": str(exc)}
        applied, needs_restart = config_mod.diff_live(self.cfg, new)
        if any(a.startswith("vips") for a in applied):
            removed, added = self.tables.set_vips(new.vips)
            for vip in removed:
                self.session.stop_serving(vip, new.vips)
            self.session.serve(added)
            self.pump.set_vips(new.vips)
        self.cfg = new
        if any(a.startswith("health") for a in applied):
            self.health.reconfigure(new.health)
        # the targets follow the VIPs' servers, node.serve and health.check_peers
        self._update_health_targets()
        self._publish_meta()
        await self.tables.rebuild()
        if needs_restart:
            log.warning("reload: these changes need a restart and were not applied: %s", ", ".join(needs_restart))
        log.info("reload: applied %s", ", ".join(applied) or "nothing (no change)")
        return {"applied": applied, "needs_restart": needs_restart}


def run_agent(cfg: config_mod.Config, keys: tuple[bytes, ...], config_path: str | None = None) -> int:
    logging.basicConfig(
        level=getattr(logging, str(getattr(cfg.node, "log_level", "info")).upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # uvloop for the agent's own loop only, not as the global policy: pyroute2 runs
    # loops of its own for netlink sockets, which uvloop cannot open
    try:
        import uvloop  # noqa: PLC0415

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(Agent(cfg, keys, config_path).run())

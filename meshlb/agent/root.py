"""The agent (`meshlb join`): composition root of one mix.

It wires, on one asyncio loop: the XDP balancer and the socket-release tracer (loaded,
or adopted from their pins after a restart), the gossip driver around the sans-IO
cluster node, health checks, the control socket and the metrics endpoint. Its one job
beyond wiring is to keep the data plane equal to the cluster's view: whenever
membership, metadata or health changes, it recomputes every VIP's Maglev table
(meshlb.forwarding) and swaps the changed ones in.

Backends in the data plane are numbered locally: (member, port) -> id. An id stays
bound to its member until the member is forgotten, so flows pinned by conntrack to a
member that turned suspect keep flowing while only new flows move.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import signal
import socket
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

from meshlb import config as config_mod
from meshlb.config import VipConfig
from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import Balancer
from meshlb.dataplane.libbpf import BpfError
from meshlb.dataplane.marks import MarkStore
from meshlb.agent.operations import Operations
from meshlb.agent.session import Session
from meshlb.agent.tables import TableSync
from meshlb.dataplane.tracer import SockEvent, Tracer
from meshlb.looplag import LoopLag

log = logging.getLogger("meshlb.agent")

# (backend_id, flags, syn_seq) of a struct ct_value's bytes: what decides whether a
# close is this mix's alone (Agent._balanced_here_only)
_CT_OWNER = struct.Struct(f"={L.CtValue.backend_id.offset}xII"
                          f"{L.CtValue.syn_seq.offset - L.CtValue.flags.offset - 4}xI")
assert (L.CtValue.flags.offset == L.CtValue.backend_id.offset + 4
        and _CT_OWNER.size == ctypes.sizeof(L.CtValue))
MARKS_SAVE_INTERVAL_S = 1.0
# Socket closes are read at most every 5 ms: a burst costs one loop wakeup per batch,
# not per close, and 5 ms is nothing against the eviction's trip through the cluster.
TRACER_BATCH_DELAY_S = 0.005
# At most this many closes per batch: a reader behind a backlog of thousands must not
# hold the loop for all of them while probes wait (peers would suspect a busy member).
TRACER_MAX_BATCH = 256
# Longest a batch of socket closes waits in the ring for its evictions to go out.
CLOSES_HOLD_MAX_S = 1.0
REBUILD_DEBOUNCE_S = 0.02


class Agent:
    def __init__(self, cfg: config_mod.Config, keys: tuple[bytes, ...], config_path: str | None = None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.config_path = config_path
        self.name = cfg.node.name
        self.vips = cfg.vips
        self.session = Session(cfg)
        self.tables: TableSync | None = None
        self.balancer: Balancer | None = None
        self.tracer: Tracer | None = None
        self.marks: MarkStore | None = None
        self.address = ""  # advertised address: the node's identity in the data plane
        self.driver: Any = None
        self.health: Any = None
        self.ops: Operations | None = None
        self.evictions: Counter[str] = Counter()
        self._to_publish: list[Any] = []
        self._closing: list[SockEvent] = []  # this batch's closes, evicted when it ends
        # what _is_balanced_flow asks of every close: VIP endpoints (rebuilt when the
        # VIP list is replaced) and member addresses (forgotten on every cluster event)
        self._vip_ends: frozenset[tuple[str, int]] = frozenset()
        self._vip_ends_of: Any = None
        self._member_addrs: frozenset[str] | None = None
        self._received: list[bytes] = []  # peers' evictions, applied once per loop turn
        self.loop_lag = LoopLag()
        self.health_checks: Counter[tuple[str, str]] = Counter()
        self.draining = False
        self._published_seq = 0  # number of this run's last own eviction
        self._held_through: int | None = None  # the held batch of closes waits for this one
        self._hold_timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._leave_requested = False
        self._tasks: list[asyncio.Task] = []
        self.started = time.time()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self._open_session()
            await self._start_gossip()
            await self._start_health()
            self.ops = Operations(self, self.session, self.tables, self.driver, self.health, evictions=self.evictions,
                                  health_checks=self.health_checks, loop_lag=self.loop_lag)
            await self.ops.start(self.cfg.node.control, self.cfg.node.metrics)
            self._start_tracer_reader()
            await self.tables.rebuild()
            self._tasks.append(asyncio.create_task(self._warm_neighbours_loop(), name="neighbours"))
            self._tasks.append(asyncio.create_task(self._save_marks_loop(), name="eviction-marks"))
            self._tasks.append(asyncio.create_task(self._expiry_loop(), name="conntrack-expiry"))
            self._tasks.append(asyncio.create_task(self.loop_lag.run(), name="loop-lag"))
            loop.add_signal_handler(signal.SIGTERM, self.request_leave)
            loop.add_signal_handler(signal.SIGINT, self.request_leave)
            loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
            log.info(
                "%s: serving %d VIP(s) on %s (xdp %s%s), gossip on %s",
                self.name, len(self.vips), self.cfg.node.iface, self.session.xdp_mode,
                ", adopted pinned state" if self.session.adopted else "", self.cfg.node.bind,
            )
            await self._stop.wait()
            if self._leave_requested:
                await self._drain_and_leave()
            return 0
        finally:
            await self._shutdown()

    def request_leave(self) -> None:
        if not self._leave_requested:
            log.info("leave requested: draining")
            self._leave_requested = True
            self._stop.set()

    async def _shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.ops:
            await self.ops.stop()
        if self.health:
            with contextlib.suppress(Exception):
                await self.health.stop()
        if self.tables is not None:
            await self.tables.stop()
        if self.tracer:
            # closes not yet read, or read but unsent, stay in the ring for the next agent
            self.tracer.stop()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        with contextlib.suppress(Exception):
            self._apply_received()
        if self.driver and not self._leave_requested:
            with contextlib.suppress(Exception):
                await self.driver.stop(leave=False)
        if not self._leave_requested:
            # not a leave (an error): pinned state stays so forwarding carries on and
            # the next agent adopts it
            self._save_marks()
        self.session.close(unpin=self._leave_requested)

    # ------------------------------------------------------------------ data plane

    def _open_session(self) -> None:
        self.session.open()
        self.balancer, self.tracer, self.marks = self.session.balancer, self.session.tracer, self.session.marks
        self.address = self.session.address

    def _save_marks(self) -> None:
        if self.marks is None or self.driver is None:
            return
        try:
            self.marks.save((e.origin, e.epoch, e.contiguous) for e in self.driver.eviction_marks())
        except (BpfError, OSError, ValueError) as exc:
            self.evictions["marks_save_failed"] += 1
            log.warning("cannot save eviction marks: %s", exc)

    async def _save_marks_loop(self) -> None:
        # A mark saved late only makes a restarted agent ask for a few evictions it
        # already applied (harmless); a mark ahead of what was applied would lose some,
        # and cannot happen: marks are read after the evictions were applied.
        while True:
            await asyncio.sleep(MARKS_SAVE_INTERVAL_S)
            self._save_marks()

    # ------------------------------------------------------------------ gossip

    def _own_meta(self) -> Any:
        from meshlb.cluster.node import MemberMeta  # noqa: PLC0415

        return MemberMeta(
            vips=tuple(v.key for v in self.vips),
            weight=0 if self.draining else 100,
            app_healthy=(not self.draining) and self._app_healthy(),
            table_digest=self.tables.digest if self.tables else "",
            observations=self._observations(),
            addresses=tuple(self.session.data_addresses),
        )

    def _publish_meta(self) -> None:
        if self.driver is not None:
            self.driver.update_meta(self._own_meta())

    async def _start_gossip(self) -> None:
        from meshlb.agent.gossip import build_driver  # noqa: PLC0415
        from meshlb.cluster.messages import DigestEntry  # noqa: PLC0415

        marks = [DigestEntry(o, e, m, ()) for o, (e, m) in self.session.restored_marks.items()]
        self.driver = build_driver(self.cfg, name=self.name, address=self.address, keys=self.keys,
                                   meta=self._own_meta(), on_event=self._on_cluster_event,
                                   event_queue=0, eviction_marks=marks)
        self.tables = TableSync(self.balancer, self.name, self.driver, on_digest=self._publish_meta)
        self.tables.set_vips(self.vips)
        self.session.serve(self.vips)
        await self.driver.start()

    def _on_cluster_event(self, event: Any) -> None:
        t = type(event)
        if t is _evictions_received():
            # a run: the records are the data plane's keys already
            self.evictions["received"] += len(event.records)
            if not self._received:
                asyncio.get_running_loop().call_soon(self._apply_received)
            self._received.extend(event.records)
            return
        if t is _eviction_received():
            self.evictions["received"] += 1
            self._queue_received(event.tuple)
            return
        self._member_addrs = None  # a member came, went or changed its addresses
        kind = type(event).__name__
        member = getattr(event, "member", None)
        if member is not None and member.name != self.name:
            log.info("member %s: %s (incarnation %s)", member.name, kind, member.incarnation)
            if self.health is not None and kind in ("MemberUp", "MemberLeft", "MemberDead"):
                self._update_health_targets()
        self.tables.schedule()

    # ------------------------------------------------------------------ evictions

    def _start_tracer_reader(self) -> None:
        # Each batch of socket closes stays in the pinned ring buffer until the
        # evictions it published have gone out: an agent killed in between leaves
        # them for the next one to read and publish again, instead of taking them along.
        self.driver.on_sent = self._release_closes
        self.tracer.start(callback=self._on_sock_event, batch_delay=TRACER_BATCH_DELAY_S,
                          on_batch=self._hold_closes, max_batch=TRACER_MAX_BATCH)

    def _hold_closes(self) -> None:
        self._evict_closes()
        self._publish_batch()
        self._held_through = self._published_seq
        self._hold_timer = asyncio.get_running_loop().call_later(CLOSES_HOLD_MAX_S, self._release_held_closes)
        self._release_closes()

    def _release_closes(self) -> None:
        need = self._held_through
        if need is not None and self.driver.evictions_sent_through() >= need:
            self._release_held_closes(sent=True)

    def _release_held_closes(self, sent: bool = False) -> None:
        if self._held_through is None:
            return
        if not sent:
            # gossip is stuck or nobody has answered the join: local evictions must
            # not stall behind it
            self.evictions["closes_released_unsent"] += 1
        self._held_through = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.tracer.commit()

    def _on_sock_event(self, ev: SockEvent) -> None:
        if not self._is_balanced_flow(ev.flow):
            # e.g. a peer's health check of this node's app: not a balanced flow, and
            # gossiping it would only cost every member a useless eviction
            self.evictions["socket_closed_unbalanced"] += 1
            return
        # a segment no socket took here: the flow is over for its client (reset) and no
        # socket of it will close here; evicted like a close
        self.evictions["flow_refused" if ev.refused else "socket_closed"] += 1
        # evicted and published with the rest of its batch (_hold_closes): one
        # syscall and one flush of the protocol per batch, not per close
        self._closing.append(ev)

    def _evict_closes(self) -> None:
        closing, self._closing = self._closing, []
        if not closing:
            return
        # the program wrote each key exactly as conntrack keys the flow
        results = self.balancer.evict_many([ev.raw_key for ev in closing])
        for ev, (result, ct) in zip(closing, results):
            if result != L.MLB_EVICT_NONE:
                self.evictions["applied_local"] += 1
            if result == L.MLB_EVICT_FORWARD and not ev.refused and self._balanced_here_only(ct):
                # the router brought every packet of it here and this mix passed them
                # to itself: no other mix holds the flow, nobody needs to hear of it
                self.evictions["local_only"] += 1
                continue
            # the key as the program wrote it is the flow record the protocol sends
            self._to_publish.append(ev.raw_key)

    def _balanced_here_only(self, ct: bytes) -> bool:
        """An entry (the bytes of its ct_value) set up here by the flow's SYN, for this
        node's own backend, that never saw a packet of the flow come from a peer (the
        data plane marks that, and entries picked up mid-flow). A flow whose SYN
        reached another mix first and whose retransmitted SYN came here (the router
        changed its mind in between) leaves that mix an entry that never saw the
        client's ACK: the handshake timeout removes it."""
        backend_id, flags, syn_seq = _CT_OWNER.unpack(ct)
        return syn_seq != 0 and not flags & L.MLB_CT_F_PEER_SEEN and backend_id in self.tables.local_ids

    def _publish_batch(self) -> None:
        flows, self._to_publish = self._to_publish, []
        if not flows:
            return
        if not self.driver.running:
            self.evictions["unpublished_left_cluster"] += len(flows)  # closes after the leave
            return
        seq = self.driver.publish_eviction_records(flows)
        if seq:
            self._published_seq = seq
        self.evictions["sent"] += len(flows)

    def _is_balanced_flow(self, f: Any) -> bool:
        """A closed socket whose local end is a VIP is a balanced flow. One whose local
        end is this node's nat backend endpoint is one only if its remote end is a SNAT
        source: the tracer already keeps remote ports to the SNAT range; the address
        must be a member's. Until the join is answered the members are unknown (a
        restarted agent replaying the closes its previous life left unsent): an
        eviction too many costs a lookup, one too few leaves a flow behind."""
        if self._vip_ends_of is not self.vips:
            self._vip_ends = frozenset((str(s.address), s.port) for s in self.vips)
            self._vip_ends_of = self.vips
        if (f.dst, f.dport) in self._vip_ends:
            return True
        if not self.driver.joined:
            return True
        addrs = self._member_addrs
        if addrs is None:
            addrs = self._member_addrs = frozenset(
                a for m in self.driver.members() for a in (m.address[0], *m.meta.addresses))
        return f.src in addrs

    def _queue_received(self, t: Any) -> None:
        """A peer's eviction, applied with the others of the same loop turn (a
        datagram carries many): one syscall for all of them."""
        try:
            key = L.flow_key_bytes(t.client, t.client_port, t.vip, t.vip_port, t.proto)
        except (ValueError, TypeError):
            self.evictions["malformed"] += 1
            return
        if not self._received:
            asyncio.get_running_loop().call_soon(self._apply_received)
        self._received.append(key)

    def _apply_received(self) -> None:
        """Each key is read by its destination: a VIP (the forward entry a mix holds
        for the flow) or a backend endpoint (a nat flow named as its backend saw it)."""
        keys, self._received = self._received, []
        if keys:
            self.evictions["applied"] += sum(1 for r, _ in self.balancer.evict_many(keys) if r)

    async def _warm_neighbours_loop(self) -> None:
        """Keep the kernel's neighbour entries of every member address fresh, IPv6 ones
        included (health checks use the gossip address only): bpf_fib_lookup cannot
        resolve a neighbour itself, and a miss passes the packet to the local stack."""
        socks = {}
        try:
            for fam in (socket.AF_INET, socket.AF_INET6):
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.setblocking(False)
                socks[fam] = s
            while True:
                for m in self.driver.members():
                    if m.name == self.name or m.status.value not in ("alive", "suspect"):
                        continue
                    for addr in {m.address[0], *m.meta.addresses}:
                        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
                        if addr.lower().startswith("fe80"):
                            continue
                        with contextlib.suppress(OSError):
                            socks[fam].sendto(b"", (addr, 9))  # discard port: resolution is the point
                await asyncio.sleep(max(1.0, self.cfg.health.interval))
        finally:
            for s in socks.values():
                s.close()

    async def _expiry_loop(self) -> None:
        """Two backstops that need no close: the idle sweep (flows whose close was
        missed) and the handshake timeout (a SYN nobody finished: a client that gave
        up, a spoofed source). Reads the config on every round, so that a reload that
        switches either on, off or to another period takes effect."""
        last_sweep = time.monotonic()
        while True:
            ct = self.cfg.conntrack
            periods = [ct.sweep_interval_s] if ct.idle_timeout_s > 0 else []
            if ct.handshake_timeout_s > 0:
                periods.append(max(0.25, ct.handshake_timeout_s / 2))
            await asyncio.sleep(min(periods, default=1.0))
            ct = self.cfg.conntrack
            sweep = ct.idle_timeout_s > 0 and time.monotonic() - last_sweep >= ct.sweep_interval_s
            if not sweep and ct.handshake_timeout_s <= 0:
                continue
            try:
                # off the loop: a full map is a quarter million entries, tens of ms
                # of Python even filtered on the raw bytes, and probes must not wait
                swept, expired = await asyncio.to_thread(
                    self._expire_stale, int(ct.idle_timeout_s * 1e9) if sweep else 0,
                    int(ct.handshake_timeout_s * 1e9))
                self.evictions["swept"] += swept
                self.evictions["handshake_timeout"] += expired
            except Exception:
                log.exception("conntrack expiry failed")
            if sweep:
                last_sweep = time.monotonic()

    def _expire_stale(self, idle_ns: int, handshake_ns: int) -> tuple[int, int]:
        idle, half_open = self.balancer.conntrack_stale(time.monotonic_ns(), idle_ns, handshake_ns)
        return (self.balancer.conntrack_expire(idle) if idle else 0,
                self.balancer.conntrack_expire(half_open) if half_open else 0)

    # ------------------------------------------------------------------ health

    def _app_healthy(self) -> bool:
        if self.health is None:
            return True
        r = self.health.result(self.name)
        # no verdict yet (a restart): keep serving as before rather than announce the
        # app down and move live flows' new neighbours away for a check interval
        return True if r is None or not r.checks else r.ok

    def _observations(self) -> dict[str, bool]:
        if self.health is None:
            return {}
        # only failures: the usable rule counts "down" reports, and a full map of every
        # member would not fit a datagram in a large cluster
        return {name: False for name, r in self.health.results().items()
                if name != self.name and r is not None and not r.ok}

    async def _start_health(self) -> None:
        from meshlb.health import HealthChecker  # noqa: PLC0415

        self.health = HealthChecker.from_config(self.cfg.health, on_change=self._on_health_change,
                                                on_result=self._on_health_result)
        self._update_health_targets()
        await self.health.start()

    def _update_health_targets(self) -> None:
        hc = self.cfg.health
        port = hc.app_port or (self.vips[0].target_port if self.vips else 80)
        targets = {self.name: (self.address, port)}
        if hc.check_peers:
            allowed = None if hc.check_peers is True else set(hc.check_peers)
            for m in self.driver.members():
                if m.name != self.name and m.status.value in ("alive", "suspect") and (allowed is None or m.name in allowed):
                    targets[m.name] = (m.address[0], port)
        self.health.set_targets(targets)

    def _on_health_change(self, name: str, ok: bool) -> None:
        log.info("health: %s %s", name, "up" if ok else "DOWN")
        self._publish_meta()
        self.tables.schedule()

    def _on_health_result(self, name: str, ok: bool) -> None:
        self.health_checks[(name, "ok" if ok else "fail")] += 1

    # ------------------------------------------------------------------ leave

    async def _drain_and_leave(self) -> None:
        self.draining = True
        self._publish_meta()  # peers stop sending new flows here
        self.tables.serving = False
        await self.tables.rebuild()  # and so does this node's own balancer
        deadline = time.monotonic() + self.cfg.drain.timeout_s
        while time.monotonic() < deadline and self._local_established() > 0:
            await asyncio.sleep(0.2)
        left = self._local_established()
        if left:
            log.warning("drain timeout: %d connection(s) still open", left)
        with contextlib.suppress(Exception):
            await self.driver.stop(leave=True)

    def _local_established(self) -> int:
        """TCP connections established to this node's VIPs (dr) or backend ports (nat)."""
        endpoints = set()
        for s in self.vips:
            if s.protocol == "tcp":
                endpoints.add((s.address, s.port))
                if s.mode == "nat":
                    endpoints.add((ipaddress.ip_address(self.address), s.target_port))
        return _count_established(endpoints)

    # ------------------------------------------------------------------ reload

    def _reload_soon(self) -> None:
        asyncio.get_running_loop().create_task(self.reload())

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
            self._apply_vip_changes(new.vips)
        self.cfg = new
        if self.health is not None and any(a.startswith("health") for a in applied):
            self.health.reconfigure(new.health)
            self._update_health_targets()
        self._publish_meta()
        await self.tables.rebuild()
        if needs_restart:
            log.warning("reload: these changes need a restart and were not applied: %s", ", ".join(needs_restart))
        log.info("reload: applied %s", ", ".join(applied) or "nothing (no change)")
        return {"applied": applied, "needs_restart": needs_restart}

    def _apply_vip_changes(self, vips: tuple[VipConfig, ...]) -> None:
        removed, added = self.tables.set_vips(vips)
        for vip in removed:
            self.session.stop_serving(vip, vips)
        self.vips = vips
        self.session.serve(added)


@functools.cache
def _eviction_received() -> type:
    # the protocol is imported late (see _start_gossip); this runs for every eviction
    # a peer sends, where a function-level import costs more than the rest of the test
    from meshlb.cluster.node import EvictionReceived  # noqa: PLC0415

    return EvictionReceived


@functools.cache
def _evictions_received() -> type:
    from meshlb.cluster.node import EvictionsReceived  # noqa: PLC0415

    return EvictionsReceived


def _count_established(endpoints: set[tuple[Any, int]]) -> int:
    """Count ESTABLISHED TCP sockets whose local end is one of ``endpoints``."""
    n = 0
    for path, fam in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "01":  # 01 = TCP_ESTABLISHED
                continue
            hexaddr, hexport = parts[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints the address as host-order 32-bit words
            words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
            addr = ipaddress.ip_address(b"".join(words))
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if (addr, int(hexport, 16)) in endpoints:
                n += 1
    return n


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

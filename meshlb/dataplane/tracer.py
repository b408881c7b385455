"""The socket-release tracer: tells the agent when a connection it balances ends.

bpf/tracer.bpf.c hooks the ``inet_sock_set_state`` tracepoint and, for every TCP
socket of this network namespace that reaches CLOSE with its local end on a watched
endpoint, writes a ``struct sock_event`` into a ring buffer. This module loads and
attaches that program, maintains the watch list, and turns ring-buffer records into
:class:`SockEvent` objects, either synchronously (:meth:`Tracer.poll`) or on an
asyncio loop (:meth:`Tracer.start` / :meth:`Tracer.events`).

A second program, attached to a cgroup v2 directory (:meth:`Tracer.attach_cgroup`),
sees the same closes from the sockets' sock_ops hook; the kernel runs it where it
skips tracing programs (bpf/tracer.bpf.c, meshlb_sock_ops).

Every tracing program sees every socket of the machine, whatever namespace its
loader lives in; in a lab with several agents on one kernel each agent must see
only its own sockets. The program therefore compares each socket's netns cookie with
the one it was loaded with, which defaults to the cookie of the loader's namespace.

State outlives the agent: :meth:`Tracer.pin` pins the maps and the link under a
directory of bpffs and :meth:`Tracer.adopt` picks them up again in a new process,
keeping the events that arrived in between (they wait in the ring buffer). A reader
started with ``on_batch`` leaves each batch in the ring until it commits it, so the
events a killed process had read but not yet acted on are read again by the next.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from . import layouts as L
from .libbpf import BpfError, BpfObject, Link, Map, Program, RingReader

__all__ = ["Tracer", "SockEvent", "Flow", "TracerStats", "own_netns_cookie",
           "endpoint_key", "TRACER_OBJECT", "TCP_STATES"]

TRACER_OBJECT = Path(__file__).with_name("bpf") / "tracer.bpf.o"
PROGRAM = "meshlb_sock_close"
# Attached after PROGRAM; reports what the kernel's recursion guard made PROGRAM
# miss (bpf/tracer.bpf.c says how).
PROGRAM_BACKUP = "meshlb_sock_close_backup"
# Reports segments of watched endpoints that no socket took (the kernel reset them).
PROGRAM_RESET = "meshlb_reset_sent"
# The cgroup sock_ops program: the same closes, for sockets accepted since it attached.
PROGRAM_SOCKOPS = "meshlb_sock_ops"
MAP_WATCHED = "watched_endpoints"
MAP_EVENTS = "sock_events"
MAP_STATS = "tracer_stats"
CONFIG_VAR = "tracer_cfg"
MAP_CONFIG = ".rodata"   # holds tracer_cfg; pinned so an adopter can read the filter
PIN_CONFIG = "config"
PIN_LINK = "link"
PIN_LINK_BACKUP = "link_backup"
PIN_LINK_RESET = "link_reset"
PIN_LINK_SOCKOPS = "link_sockops"
LINK_PINS = {PROGRAM: PIN_LINK, PROGRAM_BACKUP: PIN_LINK_BACKUP, PROGRAM_RESET: PIN_LINK_RESET,
             PROGRAM_SOCKOPS: PIN_LINK_SOCKOPS}
# What pin() leaves in its directory; adopt() and unpin() expect exactly these.
PIN_NAMES = (MAP_WATCHED, MAP_EVENTS, MAP_STATS, PIN_CONFIG, PIN_LINK, PIN_LINK_BACKUP, PIN_LINK_RESET,
             PIN_LINK_SOCKOPS)

SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h; not in Python 3.11
# The balancer's maps the tracer evicts local-only closes in (its own stand-ins when
# loaded without them: every close is then reported).
SHARED_MAPS = ("conntrack", "ct_closed", "backends")
# SockEvent.oldstate of a segment no socket took: not a TCP state
RESET = L.MLB_SOCK_EVENT_RESET

# enum tcp_state (include/net/tcp_states.h), for readable oldstate values.
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
    11: "CLOSING", 12: "NEW_SYN_RECV",
}


def own_netns_cookie() -> int:
    """The cookie of the calling thread's network namespace.

    Any socket reports the namespace it was created in; AF_UNIX exists even in a
    namespace without IPv4 or IPv6 configured.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def _unmap(addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr)
    # The program reports a dual-stack socket's IPv4 peer as IPv4; watch the same way.
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def endpoint_key(addr, port: int, proto: int = L.IPPROTO_TCP) -> bytes:
    """The ``struct endpoint_key`` bytes the program looks up for a local endpoint."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    family, words = L.addr_words(_unmap(addr))
    k = L.EndpointKey(port=L.port_be(port), proto=proto, family=family)
    k.addr[:] = words
    return bytes(k)


# struct sock_event read straight from a record: a busy backend decodes thousands a
# second, and a ctypes copy plus two dataclasses cost most of it
_KEY_SIZE = ctypes.sizeof(L.FlowKey)
_EV_TAIL = struct.Struct(f"={L.SockEvent.netns_cookie.offset}xQQI")  # cookie, ts, oldstate
_EV_PORTS = struct.Struct(f"!{L.FlowKey.sport.offset}xHH")  # network order
_EV_SIZE = ctypes.sizeof(L.SockEvent)
_EV_PROTO, _EV_FAMILY = L.FlowKey.proto.offset, L.FlowKey.family.offset
_EV_SRC, _EV_DST = L.FlowKey.src.offset, L.FlowKey.dst.offset
assert (L.SockEvent.key.offset == 0 and L.FlowKey.dport.offset == L.FlowKey.sport.offset + 2
        and L.SockEvent.timestamp_ns.offset == L.SockEvent.netns_cookie.offset + 8
        and L.SockEvent.oldstate.offset == L.SockEvent.timestamp_ns.offset + 8)
_ADDR_LEN: dict[int, int] = {L.AF_INET: 4, L.AF_INET6: 16}


class Flow(NamedTuple):
    """A flow as the balancer keys it: src = the remote peer (client or SNAT
    address), dst = the local endpoint (VIP or backend)."""

    family: int
    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    def key(self) -> bytes:
        """The ``struct flow_key`` bytes (network order), as conntrack keys flows."""
        return bytes(L.flow_key(self.src, self.sport, self.dst, self.dport, self.proto))


class SockEvent(NamedTuple):
    flow: Flow
    netns_cookie: int
    timestamp_ns: int   # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
    oldstate: int       # TCP state the socket left (TCP_STATES), or RESET: no socket
                        # took a segment of the flow and the kernel answered it with a reset
    raw_key: bytes      # the flow_key exactly as the program wrote it

    @property
    def oldstate_name(self) -> str:
        if self.oldstate == RESET:
            return "RESET"
        return TCP_STATES.get(self.oldstate, str(self.oldstate))

    @property
    def refused(self) -> bool:
        """The flow was refused here (no socket), not closed by one."""
        return self.oldstate == RESET

    @classmethod
    def decode(cls, record: bytes) -> SockEvent:
        if len(record) < _EV_SIZE:
            raise ValueError(f"sock_event: {len(record)} bytes, need {_EV_SIZE}")
        family = record[_EV_FAMILY]
        alen = _ADDR_LEN.get(family)
        if alen is None:
            raise ValueError(f"sock_event with address family {family}")
        sport, dport = _EV_PORTS.unpack_from(record)
        cookie, ts, oldstate = _EV_TAIL.unpack_from(record)
        flow = Flow(family, record[_EV_PROTO],
                    socket.inet_ntop(family, record[_EV_SRC:_EV_SRC + alen]), sport,
                    socket.inet_ntop(family, record[_EV_DST:_EV_DST + alen]), dport)
        return cls(flow, cookie, ts, oldstate, bytes(record[:_KEY_SIZE]))


@dataclass(frozen=True)
class TracerStats:
    emitted: int        # records written to the ring buffer
    ringbuf_full: int   # records lost because the ring buffer was full
    queue_dropped: int  # decoded events lost because the asyncio queue was full
    bad_records: int    # records that did not decode (skipped)
    recovered: int = 0  # closes the primary program missed, the backup caught
    missed: int = 0     # runs the kernel skipped (recursion), every program: closes
                        # are lost only where the other program missed the same one
    resets: int = 0     # of emitted: segments no socket took, reset by the kernel
    resets_limited: int = 0  # resets not reported: over the per-CPU budget
    local_evicted: int = 0  # closes of flows no other mix can hold: evicted by the
                            # program itself, not reported
    sockops: int = 0    # closes the cgroup sock_ops program handled (reported or evicted);
                        # the tracepoint's programs skip those


class Tracer:
    """Loader, watch list and reader of the socket-release tracer.

    ``netns_cookie``: report sockets of that namespace only; None (default) means
    the caller's own namespace, 0 means every namespace.
    """

    def __init__(self, netns_cookie: int | None = None, *,
                 object_path: str | os.PathLike | None = None,
                 ring_size: int | None = None, queue_size: int = 65536,
                 balancer_pins: str | os.PathLike | None = None) -> None:
        # None only on an adopted tracer whose config pin is missing.
        self.netns_cookie: int | None = (own_netns_cookie() if netns_cookie is None
                                         else netns_cookie)
        self.object_path = Path(object_path) if object_path else TRACER_OBJECT
        # Bytes of the ring buffer (power of two, multiple of the page size);
        # None keeps the object's default.
        self.ring_size = ring_size
        # where the balancer pinned its maps (SHARED_MAPS): given, the program evicts
        # closes of flows only this mix can hold itself instead of reporting them
        self.balancer_pins = Path(balancer_pins) if balancer_pins is not None else None
        self._config: Map | None = None
        self._obj: BpfObject | None = None
        self._watched: Map | None = None
        self._events: Map | None = None
        self._stats: Map | None = None
        self._links: dict[str, Link] = {}  # program name -> its attachment
        self._rb: RingReader | None = None
        self._pending: list[SockEvent] = []
        self._callback: Callable[[SockEvent], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None
        self._queue: asyncio.Queue[SockEvent] | None = None
        self._queue_size = queue_size
        self._queue_dropped = 0
        self._bad_records = 0
        self._pin_dir: Path | None = None
        self._batch_delay = 0.0
        self._max_batch = 0
        self._batch_timer: asyncio.TimerHandle | None = None
        self._on_batch: Callable[[], None] | None = None
        self._registered = False

    # ------------------------------------------------------------- lifecycle
    def load(self) -> None:
        if self._obj is not None or self._watched is not None:
            raise RuntimeError("tracer already loaded")
        obj = BpfObject.open(str(self.object_path))
        try:
            obj.set_global(CONFIG_VAR, bytes(L.TracerConfig(netns_cookie=self.netns_cookie)))
            if self.ring_size is not None:
                obj.set_max_entries(MAP_EVENTS, self.ring_size)
            if self.balancer_pins is not None:
                for name in SHARED_MAPS:
                    obj.reuse_pinned_map(name, str(self.balancer_pins / name))
            obj.load()
            self._watched = obj.map(MAP_WATCHED)
            self._events = obj.map(MAP_EVENTS)
            self._stats = obj.map(MAP_STATS)
            self._config = obj.map(MAP_CONFIG)
        except BaseException:
            obj.close()
            raise
        self._obj = obj

    def attach(self, programs: tuple[str, ...] = (PROGRAM, PROGRAM_BACKUP, PROGRAM_RESET)) -> Link:
        """Attach the primary program, then the backup (order matters: the backup
        must run after the primary for each event), then the reset reporter.
        Returns the first link.
        Tracepoint links cannot be detached: they go when the last reference (fd
        or pin) does, see :meth:`unpin` and :meth:`close`."""
        if self._obj is None:
            raise RuntimeError("load() the tracer before attach()")
        for name in programs:
            if name not in self._links:
                self._links[name] = self._obj.program(name).attach()
        return self._links[programs[0]]

    def attach_cgroup(self, path: str | os.PathLike) -> Link:
        """Attach the sock_ops program to the cgroup v2 directory ``path``: closes of
        sockets accepted from then on by processes in it (or below) are reported from
        there too, once. Without it the tracepoint alone reports, and the kernel does
        not run tracing programs for every hit (bpf/tracer.bpf.c)."""
        if self._obj is None:
            raise RuntimeError("load() the tracer before attach_cgroup()")
        if PROGRAM_SOCKOPS not in self._links:
            self._links[PROGRAM_SOCKOPS] = self._obj.program(PROGRAM_SOCKOPS).attach_cgroup(path)
        return self._links[PROGRAM_SOCKOPS]

    @property
    def sockops_attached(self) -> bool:
        return PROGRAM_SOCKOPS in self._links

    @property
    def link(self) -> Link | None:
        return self._links.get(PROGRAM)

    def pin(self, directory: str | os.PathLike) -> None:
        """Pin maps (and the link, if attached) under ``directory`` on bpffs."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        watched, events, stats = self._require_maps("pin")
        watched.pin(str(d / MAP_WATCHED))
        events.pin(str(d / MAP_EVENTS))
        stats.pin(str(d / MAP_STATS))
        if self._config is not None:
            self._config.pin(str(d / PIN_CONFIG))
        for name, link in self._links.items():
            link.pin(str(d / LINK_PINS[name]))
        self._pin_dir = d

    @classmethod
    def adopt(cls, directory: str | os.PathLike) -> Tracer:
        """Take over a tracer a previous process pinned under ``directory``.

        The program stays as it was loaded (including its netns filter); records
        written while nobody was reading are still in the ring buffer.
        """
        d = Path(directory)
        t = cls(netns_cookie=0)
        t.netns_cookie = None
        try:
            t._watched = Map.from_pinned(str(d / MAP_WATCHED))
            t._events = Map.from_pinned(str(d / MAP_EVENTS))
            t._stats = Map.from_pinned(str(d / MAP_STATS))
            if (d / PIN_CONFIG).exists():
                t._config = Map.from_pinned(str(d / PIN_CONFIG))
                raw = t._config.lookup(bytes(4))
                if raw is not None:
                    t.netns_cookie = L.TracerConfig.from_bytes(raw).netns_cookie
            for name, pin in LINK_PINS.items():
                if (d / pin).exists():
                    t._links[name] = Link.from_pinned(str(d / pin))
        except BaseException:
            t.close()
            raise
        t._pin_dir = d
        return t

    def unpin(self, directory: str | os.PathLike | None = None) -> None:
        """Remove the pins (the link detaches once no process holds it)."""
        d = Path(directory) if directory is not None else self._pin_dir
        if d is None:
            raise RuntimeError("not pinned and no directory given")
        for name in PIN_NAMES:
            try:
                os.unlink(d / name)
            except FileNotFoundError:
                pass
        try:
            d.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
        if d == self._pin_dir:
            self._pin_dir = None

    def close(self) -> None:
        """Stop reading and drop our references; pinned state stays in the kernel."""
        self.stop()
        if self._rb is not None:
            self._rb.close()
            self._rb = None
        for link in self._links.values():
            link.close()
        self._links = {}
        # Maps of a BpfObject belong to it; adopted maps own their fds.
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        else:
            for m in (self._watched, self._events, self._stats, self._config):
                if m is not None:
                    m.close()
        self._watched = self._events = self._stats = self._config = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ watch list
    def _require_maps(self, op: str) -> tuple[Map, Map, Map]:
        """(watched, events, stats), or an error naming ``op`` before load/adopt."""
        if self._watched is None or self._events is None or self._stats is None:
            raise RuntimeError(f"{op}: tracer is neither loaded nor adopted")
        return self._watched, self._events, self._stats

    def watch(self, addr, port: int, proto: int = L.IPPROTO_TCP,
              remote_ports: tuple[int, int] | None = None, listener_resets: bool = True) -> None:
        """Report closes of sockets whose local end is (addr, port); with
        ``remote_ports`` (lo, hi) only those whose remote port is in that range.
        Resets from a listener of the endpoint are reported only with
        ``listener_resets`` and no ``remote_ports`` (bpf/tracer.bpf.c says why): the
        program tells the two kinds apart by the presence of a port filter, so without
        one they get the filter that passes every port."""
        watched, _, _ = self._require_maps("watch")
        if remote_ports is None and not listener_resets:
            remote_ports = (1, 65535)
        lo, hi = remote_ports or (0, 0)
        if remote_ports is not None and not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad remote port range {lo}-{hi}")
        watched.update(endpoint_key(addr, port, proto), bytes(L.EndpointFilter(rport_lo=lo, rport_hi=hi)))

    def unwatch(self, addr, port: int, proto: int = L.IPPROTO_TCP) -> bool:
        watched, _, _ = self._require_maps("unwatch")
        return watched.delete(endpoint_key(addr, port, proto))

    def watched(self) -> set[tuple[str, int, int]]:
        """(address, port, proto) of every watched endpoint."""
        watched, _, _ = self._require_maps("watched")
        out = set()
        for raw in watched.keys():
            k = L.EndpointKey.from_bytes(raw)
            out.add((str(L.words_addr(k.addr, k.family)), L.port_host(k.port), k.proto))
        return out

    # ---------------------------------------------------------------- stats
    def stats(self) -> TracerStats:
        _, _, stats = self._require_maps("stats")

        def total(stat: L.TracerStat) -> int:
            vals = stats.lookup_percpu(stat.to_bytes(4, "little")) or []
            return sum(int.from_bytes(v, "little") for v in vals)

        missed = 0
        for link in self._links.values():
            with contextlib.suppress(BpfError):
                prog = Program.from_id(link.info()["prog_id"])
                try:
                    missed += prog.info()["recursion_misses"]
                finally:
                    prog.close()
        S = L.TracerStat
        return TracerStats(emitted=total(S.EMITTED), ringbuf_full=total(S.RINGBUF_FULL),
                           queue_dropped=self._queue_dropped, bad_records=self._bad_records,
                           recovered=total(S.RECOVERED), missed=missed,
                           resets=total(S.RESET), resets_limited=total(S.RESET_LIMITED),
                           local_evicted=total(S.LOCAL_EVICTED), sockops=total(S.SOCKOPS))

    # --------------------------------------------------------------- reading
    def _ring(self) -> RingReader:
        if self._rb is None:
            _, events, _ = self._require_maps("read")
            self._rb = RingReader(events)
        return self._rb

    def _on_record(self, record: bytes) -> None:
        try:
            ev = SockEvent.decode(record)
        except ValueError:
            # One bad record must not stall the reader: the ones behind it matter.
            self._bad_records += 1
            return
        if self._callback is not None:
            self._callback(ev)
        else:
            self._pending.append(ev)

    def _consume(self) -> int:
        rb = self._ring()
        try:
            return rb.read(self._on_record, limit=self._max_batch)
        finally:
            if self._on_batch is None:
                rb.commit()

    def poll(self, timeout_ms: int = 0) -> list[SockEvent]:
        """Wait up to ``timeout_ms`` for records; return those decoded.

        Not for use while an asyncio reader is running (that one gets the events).
        """
        if self._loop is not None:
            raise RuntimeError("poll() while an asyncio reader is registered")
        rb = self._ring()
        if timeout_ms != 0 and rb.committed == rb.position:
            p = select.poll()
            p.register(rb.fd, select.POLLIN)
            p.poll(timeout_ms)
        self._consume()
        out, self._pending = self._pending, []
        return out

    def start(self, callback: Callable[[SockEvent], None] | None = None,
              loop: asyncio.AbstractEventLoop | None = None, batch_delay: float = 0.0,
              on_batch: Callable[[], None] | None = None, max_batch: int = 0) -> None:
        """Read on ``loop`` (default: the running one): each event goes to
        ``callback`` or, without one, to the queue behind :meth:`events`.

        ``batch_delay`` > 0: after a wakeup, wait that long before reading, so that
        under load one wakeup of the loop reads many records instead of one each
        (the cost of a busy host's thousands of closes a second is mostly wakeups).

        ``on_batch``: called after each batch of records; the batch stays in the
        ring (a process that takes over reads it again) and nothing more is read
        until :meth:`commit`. Without it every batch is committed as it is read.

        ``max_batch`` > 0: read at most that many records per batch, the rest in the
        next one (``batch_delay`` later): a reader that fell behind must not hold the
        loop for the whole backlog while probes and datagrams wait."""
        if self._loop is not None:
            raise RuntimeError("reader already started")
        self._batch_delay = batch_delay
        self._max_batch = max_batch
        self._on_batch = on_batch
        loop = loop or asyncio.get_running_loop()
        rb = self._ring()
        if callback is None:
            self._queue = asyncio.Queue(self._queue_size)
            callback = self._enqueue
        self._callback = callback
        self._loop, self._reader_fd = loop, rb.fd
        # Records written before we registered would not wake epoll again.
        self._read_batch()

    def commit(self) -> None:
        """Release the batch handed to ``on_batch`` and read on."""
        if self._rb is None:
            return
        self._rb.commit()
        if self._loop is not None and self._batch_timer is None:
            self._resume()
            self._catch_up()

    def _catch_up(self) -> None:
        """The kernel wakes a ring's reader only for a record written while the
        consumer position was up to date: records written during a read, or while a
        batch was held, wake nobody. So after every commit the reader looks at the
        producer itself (an event loop that re-arms a descriptor without asking the
        kernel again, as libuv may, would otherwise never see them)."""
        rb = self._rb
        if rb is None or self._loop is None or self._batch_timer is not None or not rb.available():
            return
        self._pause()
        self._batch_timer = self._loop.call_later(self._batch_delay, self._read_batch)

    def holding(self) -> bool:
        """A batch was read and awaits :meth:`commit`."""
        return self._rb is not None and self._rb.uncommitted()

    def _enqueue(self, ev: SockEvent) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self._queue_dropped += 1

    def _pause(self) -> None:
        if self._registered and self._loop is not None and self._reader_fd is not None:
            self._loop.remove_reader(self._reader_fd)
            self._registered = False

    def _resume(self) -> None:
        if not self._registered and self._loop is not None and self._reader_fd is not None:
            # level-triggered: records that came meanwhile wake the reader again at once
            self._loop.add_reader(self._reader_fd, self._readable)
            self._registered = True

    def _readable(self) -> None:
        if self._rb is None or self._batch_timer is not None:
            return
        if self._batch_delay > 0 and self._loop is not None:
            self._pause()
            self._batch_timer = self._loop.call_later(self._batch_delay, self._read_batch)
            return
        self._read_batch()

    def _read_batch(self) -> None:
        self._batch_timer = None
        if self._rb is None or self._loop is None:
            return
        if self._on_batch is not None and self._rb.uncommitted():
            return  # a batch is held: commit() reads on
        try:
            self._consume()
        finally:
            if self._on_batch is not None and self._rb.uncommitted():
                # the ring stays readable until the commit: stop listening till then
                self._pause()
                try:
                    self._on_batch()
                except BaseException:
                    self.commit()
                    raise
            else:
                self._resume()
                self._catch_up()

    def stop(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        if self._loop is not None and not self._loop.is_closed():
            self._pause()
        self._registered = False
        self._loop = None
        self._reader_fd = None
        self._callback = None
        self._on_batch = None

    async def events(self) -> AsyncIterator[SockEvent]:
        """Async iterator over events; starts the reader if needed."""
        if self._loop is None:
            self.start()
        if self._queue is None:
            raise RuntimeError("reader was started with a callback; events() needs none")
        while True:
            yield await self._queue.get()

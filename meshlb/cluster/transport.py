"""UDP sockets for the cluster protocol: unicast, multicast and broadcast.

This module owns sockets and nothing else. It does not know the protocol: it sends
the bytes it is given and queues the datagrams it receives in a bounded queue that
the driver (:mod:`meshlb.cluster.driver`) drains into the sans-IO node.

Layout of sockets per mode:

* ``unicast``: one socket bound to ``bind:port``; it sends to and receives from peers.
* ``multicast``: the same unicast socket, bound to the advertised address so that it
  never sees group traffic, plus a receive-only socket bound to ``group:port`` that has
  joined the group on the interface. Group datagrams leave through the unicast socket,
  so their source is the sender's unicast address and receivers can answer it directly.
* ``broadcast``: the same unicast socket with SO_BROADCAST, plus a receive-only socket
  bound to the wildcard address (or to the broadcast address when no interface is
  given) and tied to the interface with SO_BINDTODEVICE.

The sockets are non-blocking and watched with ``loop.add_reader`` rather than wrapped
in asyncio datagram transports (asyncio-dgram included), because the transports cannot
report ICMP errors on unconnected sockets safely: Linux only reports them with
IP_RECVERR, which leaves an entry on the socket's error queue that only
``recvmsg(MSG_ERRQUEUE)`` removes. The stdlib transport never reads that queue and
spins at 100% CPU on the persisting POLLERR; uvloop's transport crashes (SIGSEGV, seen
with uvloop 0.23). Here the reader drains the error queue and counts each error.
libuv stops a poll handle for good on POLLERR, so IP_RECVERR is only turned on for the
stdlib selector loop; under uvloop ICMP errors go uncounted.

Sending is a direct non-blocking ``sendto``: when the kernel buffer is full the
datagram is dropped and counted rather than buffered (the protocol tolerates loss, and
an unbounded buffer in front of a congested link helps nobody). The receive path never
raises; a full receive queue drops the newest datagram and counts it.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_GROUP_V4",
    "DEFAULT_GROUP_V6",
    "Mode",
    "TransportConfig",
    "TransportError",
    "TransportStats",
    "UdpTransport",
    "Address",
    "parse_peer",
    "resolve_peers",
    "interface_ipv4",
    "interface_ipv6",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]

DEFAULT_PORT = 7946
# Organisation-local scope (RFC 2365): routers at the site edge do not forward it, and
# TTL 1 keeps it on the link anyway.
DEFAULT_GROUP_V4 = "239.192.77.77"
# Link-local scope: the cluster is a LAN.
DEFAULT_GROUP_V6 = "ff02::7746"

# Linux values absent from Python 3.11's socket module.
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_IP_MULTICAST_ALL = 49
_IPV6_MULTICAST_ALL = 29
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
_SO_RXQ_OVFL = 40
_SIOCGIFADDR = 0x8915
_SIOCGIFBRDADDR = 0x8919


class Mode:
    UNICAST = "unicast"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    ALL = (UNICAST, MULTICAST, BROADCAST)


class TransportError(RuntimeError):
    """The transport cannot be set up as configured (a configuration or host problem)."""


@dataclass(frozen=True)
class TransportConfig:
    """How the agent's gossip sockets are set up.

    ``bind`` is the local address of the unicast socket; empty means the wildcard in
    unicast mode and the interface's address in the group modes. ``advertise`` is the
    address other members are told to reach us at; by default the bound address, or
    the interface's address when bound to the wildcard.
    """

    mode: str = Mode.UNICAST
    bind: str = ""
    port: int = DEFAULT_PORT
    advertise: str | None = None
    advertise_port: int | None = None  # when a NAT maps another port to ours
    interface: str | None = None
    group: str | None = None          # multicast group; default by address family
    group_port: int | None = None     # default: the unicast port
    broadcast: str | None = None      # broadcast address; default the interface's
    ttl: int = 1
    multicast_loop: bool = False      # on: also hear local members (own echo filtered)
    rcvbuf: int = 1 << 20
    sndbuf: int = 1 << 20
    queue_size: int = 2048            # received datagrams waiting for the protocol

    def __post_init__(self) -> None:
        if self.mode not in Mode.ALL:
            raise TransportError(f"unknown transport mode {self.mode!r} (want one of {', '.join(Mode.ALL)})")
        for name in ("port", "advertise_port", "group_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise TransportError(f"{name} {v} out of range")
        if self.queue_size < 1:
            raise TransportError("queue_size must be at least 1")
        if not 1 <= self.ttl <= 255:
            raise TransportError(f"ttl {self.ttl} out of range 1..255")


@dataclass
class TransportStats:
    datagrams_sent: int = 0
    bytes_sent: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0
    group_sent: int = 0
    group_received: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "datagrams_sent": self.datagrams_sent,
            "bytes_sent": self.bytes_sent,
            "datagrams_received": self.datagrams_received,
            "bytes_received": self.bytes_received,
            "group_sent": self.group_sent,
            "group_received": self.group_received,
            "dropped": dict(self.dropped),
            "errors": dict(self.errors),
        }


# --- interface and address helpers ---------------------------------------------------

def _ifreq_ipv4(ifname: str, request: int) -> str | None:
    packed = struct.pack("256s", ifname.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), request, packed)
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
                return None
            raise
    return socket.inet_ntoa(res[20:24])


def interface_ipv4(ifname: str) -> tuple[str | None, str | None]:
    """(primary IPv4 address, broadcast address) of an interface; None where it has none."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        raise TransportError(f"no interface {ifname!r}") from None
    addr = _ifreq_ipv4(ifname, _SIOCGIFADDR)
    brd = _ifreq_ipv4(ifname, _SIOCGIFBRDADDR) if addr else None
    if brd == "0.0.0.0":
        brd = None
    return addr, brd


def interface_ipv6(ifname: str) -> str | None:
    """An IPv6 address of an interface, global scope preferred over link-local."""
    best: tuple[int, str] | None = None
    try:
        with open("/proc/net/if_inet6") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[5] != ifname:
            continue
        addr = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
        rank = 0 if int(parts[3], 16) == 0 else 1  # scope 0 = global
        if best is None or rank < best[0]:
            best = (rank, addr)
    return best[1] if best else None


def _family_of(host: str) -> int | None:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.split("%")[0]).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _is_unspecified(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def parse_peer(spec: str | tuple[Any, ...], default_port: int) -> Address:
    """``host``, ``host:port``, ``[v6]:port`` or ``v6`` (bare) -> (host, port)."""
    if isinstance(spec, tuple):
        return (str(spec[0]), int(spec[1]) if len(spec) > 1 else default_port)
    s = spec.strip()
    if not s:
        raise ValueError("empty peer address")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep:
            raise ValueError(f"peer {spec!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"peer {spec!r}: junk after ']'")
        port = int(rest[1:]) if rest else default_port
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = int(p)
    else:
        host, port = s, default_port  # a name, an IPv4 address or a bare IPv6 address
    if not 0 < port <= 65535:
        raise ValueError(f"peer {spec!r}: port out of range")
    return host, port


async def resolve_peers(
    specs: Iterable[str | tuple[Any, ...]], default_port: int, family: int = socket.AF_INET,
) -> tuple[list[Address], list[str]]:
    """Resolve peer specs to literal addresses of ``family``.

    Returns (addresses, specs that did not resolve). A name may stand for several
    addresses; each becomes a seed. Unresolvable names are returned rather than raised,
    so that the caller can retry them later (DNS may come up after the agent).
    """
    loop = asyncio.get_running_loop()
    out: list[Address] = []
    failed: list[str] = []
    for spec in specs:
        try:
            host, port = parse_peer(spec, default_port)
        except ValueError as exc:
            log.warning("ignoring peer: %s", exc)
            failed.append(str(spec))
            continue
        if _family_of(host) == family:
            out.append((host, port))
            continue
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            log.info("peer %s does not resolve yet: %s", spec, exc)
            failed.append(str(spec))
            continue
        for info in infos:
            addr = (str(info[4][0]), int(info[4][1]))
            if addr not in out:
                out.append(addr)
    # Keep order, drop duplicates from several specs naming the same address.
    return list(dict.fromkeys(out)), failed


# --- the asyncio side ------------------------------------------------------------------

# errnos that an earlier ICMP error leaves on a RECVERR socket; Linux reports the
# pending one on the next send too, failing that send although its destination is fine.
_DEFERRED_ICMP = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                            errno.EHOSTDOWN, errno.EMSGSIZE})
_READ_BATCH = 64  # datagrams per wake-up before giving the loop back


def _loop_handles_pollerr(loop: asyncio.AbstractEventLoop) -> bool:
    # The stdlib selector loop turns POLLERR into a read callback, which then drains
    # the error queue. libuv (uvloop) stops the poll handle on POLLERR instead, which
    # would stop the reader for good.
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


class UdpTransport:
    """The agent's gossip sockets.

    ``on_datagram`` is called (synchronously, from the event loop) after a batch of
    datagrams has been queued, so that a driver can wake up; it must not block.
    """

    def __init__(self, config: TransportConfig, *, on_datagram: Callable[[], None] | None = None) -> None:
        self.config = config
        self.stats = TransportStats()
        self.on_datagram = on_datagram
        self.recverr = False
        self._queue: collections.deque[tuple[bytes, Address]] = collections.deque()
        self._unicast_sock: socket.socket | None = None
        self._group_sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._family: int = socket.AF_INET
        self._address: Address | None = None
        self._own: Address | None = None  # the unicast socket's own address
        self._group_dest: tuple[Any, ...] | None = None
        self._ifindex = 0
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._overflow: dict[int, int] = {}  # fd -> last SO_RXQ_OVFL value seen

    # -- properties ---------------------------------------------------------------------
    @property
    def address(self) -> Address:
        """The (host, port) other members should send to."""
        if self._address is None:
            raise TransportError("transport is not open")
        return self._address

    @property
    def family(self) -> int:
        return self._family

    @property
    def has_group(self) -> bool:
        return self._group_dest is not None

    @property
    def group_destination(self) -> Address | None:
        return None if self._group_dest is None else (self._group_dest[0], self._group_dest[1])

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Datagrams received and not yet taken."""
        return len(self._queue)

    # -- setup ----------------------------------------------------------------------------
    def _pick_addresses(self) -> tuple[str, str]:
        """(address to bind the unicast socket to, address to advertise)."""
        c = self.config
        bind = c.bind
        if not _is_unspecified(bind) and _family_of(bind) is None:
            raise TransportError(f"bind address {bind!r} is not an IP address")
        if c.advertise and _family_of(c.advertise) is None:
            raise TransportError(f"advertise address {c.advertise!r} is not an IP address")
        fam = _family_of(bind) if not _is_unspecified(bind) else None
        if fam is None and bind == "::":
            fam = socket.AF_INET6
        if fam is None and c.advertise:
            fam = _family_of(c.advertise)
        if fam is None and c.group:
            fam = _family_of(c.group)
        self._family = fam or socket.AF_INET
        if self._family == socket.AF_INET6 and c.mode == Mode.BROADCAST:
            raise TransportError("IPv6 has no broadcast; use multicast")

        if_addr = None
        if c.interface:
            if self._family == socket.AF_INET:
                if_addr = interface_ipv4(c.interface)[0]
            else:
                if_addr = interface_ipv6(c.interface)
        advertise = c.advertise or (bind if not _is_unspecified(bind) else None) or if_addr
        if c.mode != Mode.UNICAST:
            # The unicast socket must not overlap the group socket's address, or it
            # would receive every group datagram a second time.
            if _is_unspecified(bind):
                bind = if_addr or advertise or ""
            if _is_unspecified(bind):
                raise TransportError(
                    f"{c.mode} mode needs an interface with an address or a bind address")
        if _is_unspecified(bind):
            bind = "0.0.0.0" if self._family == socket.AF_INET else "::"
        if advertise is None:
            raise TransportError(
                "cannot tell which address to advertise: give a bind address, an "
                "advertise address or an interface")
        return bind, advertise

    def _base_socket(self) -> socket.socket:
        c = self.config
        s = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The kernel reports in each datagram's ancillary data how many it dropped
            # for lack of buffer space, so those drops are counted too.
            s.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
            for force, opt, size in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF, c.rcvbuf),
                                     (_SO_SNDBUFFORCE, socket.SO_SNDBUF, c.sndbuf)):
                if not size:
                    continue
                try:
                    # The plain option is capped by net.core.[rw]mem_max (often 208 KiB);
                    # the forced one is not, and an agent usually runs with CAP_NET_ADMIN.
                    s.setsockopt(socket.SOL_SOCKET, force, size)
                except PermissionError:
                    try:
                        s.setsockopt(socket.SOL_SOCKET, opt, size)
                    except OSError as exc:  # a smaller buffer still works
                        log.warning("cannot set socket buffer to %d: %s", size, exc)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    def _bind_to_device(self, s: socket.socket, interface: str) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        except PermissionError:
            raise TransportError(
                "SO_BINDTODEVICE needs CAP_NET_RAW (run as root or leave the interface out)") from None

    def _unicast_socket(self, bind: str) -> socket.socket:
        c = self.config
        s = self._base_socket()
        try:
            if self.recverr:
                # Unconnected UDP sockets only hear about ICMP errors with RECVERR;
                # without it an unreachable peer is invisible to the counters.
                if self._family == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            if c.mode == Mode.MULTICAST:
                if self._family == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, c.ttl)
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(c.multicast_loop))
                    mreqn = struct.pack("=4s4si", b"\0" * 4, socket.inet_aton(bind), self._ifindex)
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, c.ttl)
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(c.multicast_loop))
                    if self._ifindex:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._ifindex)
            elif c.mode == Mode.BROADCAST:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                if c.interface:
                    self._bind_to_device(s, c.interface)
            s.bind(self._sockaddr(bind, c.port))
        except BaseException:
            s.close()
            raise
        return s

    def _group_socket(self, port: int) -> tuple[socket.socket, tuple[Any, ...]]:
        c = self.config
        s = self._base_socket()
        try:
            # Several agents on one host (a lab, a restart overlapping the old agent)
            # must all receive the group's datagrams.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if c.mode == Mode.MULTICAST:
                group = c.group or (DEFAULT_GROUP_V4 if self._family == socket.AF_INET else DEFAULT_GROUP_V6)
                if _family_of(group) != self._family or not ipaddress.ip_address(group).is_multicast:
                    raise TransportError(f"{group!r} is not a multicast group of the unicast address's family")
                if self._family == socket.AF_INET:
                    # Without this Linux delivers datagrams of any group some other
                    # socket of the host joined, as long as the port matches.
                    s.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
                    s.bind((group, port))
                    assert self._own is not None  # the unicast socket is bound first
                    local = b"\0" * 4 if self._ifindex else socket.inet_aton(self._own[0])
                    mreqn = struct.pack("=4s4si", socket.inet_aton(group), local, self._ifindex)
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                    dest: tuple[Any, ...] = (group, port)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, _IPV6_MULTICAST_ALL, 0)
                    s.bind((group, port, 0, self._ifindex))
                    mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("=I", self._ifindex)
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                    dest = (group, port, 0, self._ifindex)
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                brd = c.broadcast
                if brd is None and c.interface:
                    brd = interface_ipv4(c.interface)[1]
                brd = brd or "255.255.255.255"
                if _family_of(brd) != socket.AF_INET:
                    raise TransportError(f"broadcast address {brd!r} is not an IPv4 address")
                if c.interface:
                    # The device binding scopes the wildcard to this link, and the
                    # wildcard hears both limited and directed broadcasts.
                    self._bind_to_device(s, c.interface)
                    s.bind(("0.0.0.0", port))
                else:
                    s.bind((brd, port))
                dest = (brd, port)
        except BaseException:
            s.close()
            raise
        return s, dest

    def _sockaddr(self, host: str, port: int) -> tuple[Any, ...]:
        if self._family == socket.AF_INET6:
            host = host.split("%")[0]
            scope = self._ifindex if ipaddress.IPv6Address(host).is_link_local else 0
            return (host, port, 0, scope)
        return (host, port)

    async def open(self) -> None:
        """Create, configure and bind the sockets and start reading."""
        if self._unicast_sock is not None or self._closed:
            raise TransportError("transport already opened")
        c = self.config
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.recverr = _loop_handles_pollerr(loop)
        if c.interface:
            try:
                self._ifindex = socket.if_nametoindex(c.interface)
            except OSError:
                raise TransportError(f"no interface {c.interface!r}") from None
        bind, advertise = self._pick_addresses()
        try:
            uni = self._unicast_socket(bind)
        except OSError as exc:
            raise TransportError(f"cannot bind {bind} port {c.port}: {exc}") from exc
        port = uni.getsockname()[1]
        self._own = (uni.getsockname()[0], port)
        self._address = (advertise.split("%")[0], c.advertise_port or port)
        self._unicast_sock = uni
        try:
            if c.mode != Mode.UNICAST:
                grp, self._group_dest = self._group_socket(c.group_port or port)
                self._group_sock = grp
                loop.add_reader(grp.fileno(), self._readable, grp, True)
            loop.add_reader(uni.fileno(), self._readable, uni, False)
        except BaseException as exc:
            self._group_dest = None
            self._close_sockets()
            if isinstance(exc, OSError):
                raise TransportError(f"cannot set up the {c.mode} socket: {exc}") from exc
            raise

    # -- receive ----------------------------------------------------------------------
    def _readable(self, sock: socket.socket, is_group: bool) -> None:
        # Runs as a loop callback: anything escaping would be logged by the loop, but
        # the reader would stay registered, so catch it here and keep reading.
        queued = False
        try:
            for _ in range(_READ_BATCH):
                if self._closed:
                    return
                try:
                    data, anc, _, addr = sock.recvmsg(65535, 64)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._socket_error(sock, exc)
                    continue
                if anc:
                    self._kernel_drops(sock, anc)
                if self._received(data, addr, is_group):
                    queued = True
        except Exception:
            self.stats.errors["internal"] += 1
            log.exception("gossip socket reader failed")
        if queued:
            self._notify()

    def _kernel_drops(self, sock: socket.socket, anc: list[tuple[int, int, bytes]]) -> None:
        for lvl, typ, payload in anc:
            if lvl == socket.SOL_SOCKET and typ == _SO_RXQ_OVFL and len(payload) >= 4:
                total = struct.unpack_from("=I", payload)[0]
                fd = sock.fileno()
                delta = (total - self._overflow.get(fd, 0)) & 0xFFFFFFFF
                self._overflow[fd] = total
                if delta:
                    self.stats.dropped["socket_overflow"] += delta

    def _socket_error(self, sock: socket.socket, exc: OSError) -> None:
        # With RECVERR each ICMP error also sits on the error queue; drain it (else
        # POLLERR persists) and count each entry. Without RECVERR, count the errno.
        drained = self._drain_error_queue(sock) if self.recverr else 0
        if not drained:
            self._count_error(exc.errno)

    def _drain_error_queue(self, sock: socket.socket) -> int:
        n = 0
        level = socket.IPPROTO_IP if self._family == socket.AF_INET else socket.IPPROTO_IPV6
        kind = _IP_RECVERR if self._family == socket.AF_INET else _IPV6_RECVERR
        for _ in range(_READ_BATCH):
            try:
                _, ancdata, _, _ = sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._count_error(exc.errno)
                break
            for lvl, typ, payload in ancdata:
                if lvl == level and typ == kind and len(payload) >= 4:
                    # struct sock_extended_err starts with the u32 ee_errno.
                    self._count_error(struct.unpack_from("=I", payload)[0])
                    n += 1
        return n

    def _count_error(self, num: int | None) -> None:
        self.stats.errors[errno.errorcode.get(num or -1, f"errno{num}")] += 1

    def _received(self, data: bytes, addr: Any, is_group: bool) -> bool:
        src: Address = (addr[0], addr[1])
        if is_group and src == self._own:
            # Broadcasts always loop back; multicast does when multicast_loop is on.
            self.stats.dropped["own"] += 1
            return False
        self.stats.datagrams_received += 1
        self.stats.bytes_received += len(data)
        if is_group:
            self.stats.group_received += 1
        if len(self._queue) >= self.config.queue_size:
            # Dropping the newest keeps what is queued (older probes are as good as
            # new ones) and costs nothing; the protocol tolerates loss by design.
            self.stats.dropped["queue_full"] += 1
            return False
        self._queue.append((data, src))
        return True

    def _notify(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.on_datagram is not None:
            try:
                self.on_datagram()
            except Exception:
                log.exception("on_datagram callback failed")

    def take(self, limit: int | None = None) -> list[tuple[bytes, Address]]:
        """Remove and return up to ``limit`` queued datagrams (all when None)."""
        q = self._queue
        n = len(q) if limit is None else min(limit, len(q))
        return [q.popleft() for _ in range(n)]

    async def recv(self) -> tuple[bytes, Address]:
        """Wait for one datagram. Raises TransportError once closed."""
        while not self._queue:
            if self._closed:
                raise TransportError("transport closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    # -- send -------------------------------------------------------------------------
    def _send(self, data: bytes, dest: tuple[Any, ...], *, group: bool) -> bool:
        sock = self._unicast_sock
        if self._closed or sock is None:
            self.stats.dropped["closed"] += 1
            return False
        for attempt in (0, 1):
            try:
                sock.sendto(data, dest)
                break
            except (BlockingIOError, InterruptedError):
                self.stats.dropped["send_buffer_full"] += 1
                return False
            except OSError as exc:
                if attempt == 0 and self.recverr and exc.errno in _DEFERRED_ICMP:
                    # Most likely the pending error of an earlier ICMP report, not
                    # this datagram's: it has been cleared now, so try again once
                    # (the report itself is counted from the error queue).
                    self._drain_error_queue(sock)
                    continue
                self._count_error(exc.errno)
                self.stats.dropped["send_error"] += 1
                return False
            except (TypeError, ValueError):
                self.stats.dropped["bad_address"] += 1
                return False
        self.stats.datagrams_sent += 1
        self.stats.bytes_sent += len(data)
        if group:
            self.stats.group_sent += 1
        return True

    def send(self, data: bytes, addr: Address) -> bool:
        """Send to one member. False (and counted) when the datagram was dropped."""
        try:
            host, port = addr[0], int(addr[1])
            if _family_of(host) != self._family:
                raise ValueError(host)
            dest = self._sockaddr(host, port)
        except (ValueError, TypeError, IndexError):
            self.stats.dropped["bad_address"] += 1
            return False
        return self._send(data, dest, group=False)

    def send_group(self, data: bytes) -> bool:
        """Send to the multicast group or broadcast address; dropped when there is none."""
        if self._group_dest is None:
            self.stats.dropped["no_group"] += 1
            return False
        return self._send(data, self._group_dest, group=True)

    # -- close ------------------------------------------------------------------------
    def _close_sockets(self) -> None:
        socks = (self._unicast_sock, self._group_sock)
        self._unicast_sock = self._group_sock = None
        for sock in socks:
            if sock is None:
                continue
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(sock.fileno())
                except (ValueError, OSError, RuntimeError):
                    pass  # never registered, or the loop is going away
            sock.close()

    def close(self) -> None:
        """Close the sockets. Datagrams already handed to the kernel still leave;
        received ones not yet taken are discarded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_sockets()
        self._queue.clear()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

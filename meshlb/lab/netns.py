"""Network-namespace topologies for the lab and the integration tests.

A :class:`Topology` builds named network namespaces, a bridge living in a namespace
of its own (so nothing of the lab touches the host's interfaces or routes), veth pairs
joining node namespaces to that bridge, addresses, routes (ECMP included), loopback
VIPs and per-namespace sysctls, and runs processes inside namespaces.

Everything created is recorded the moment it exists, and :meth:`Topology.teardown`
undoes the records in reverse order, carrying on past individual failures, so a
half-built topology (an exception in the middle of a test) is still removed.

All netlink work goes through pyroute2. Things that are per-namespace but not netlink
(``/proc/sys/net`` writes, ethtool ioctls, sockets) run in a short-lived thread that
has joined the namespace with setns(2): network namespaces are a per-thread
attribute, so the rest of the process never leaves its own namespace.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import Ethtool, NetNS
from pyroute2 import netns as pr_netns

__all__ = [
    "Topology",
    "Namespace",
    "Port",
    "TopologyError",
    "run_in_netns",
    "enter_netns",
    "netns_path",
    "SO_NETNS_COOKIE",
]

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h; Python 3.11 lacks the name
IFA_F_NODAD = 0x02
# fib_multipath_hash_fields: source and destination address, protocol, source and
# destination port (Documentation/networking/ip-sysctl.rst)
L4_HASH_FIELDS = 0x0001 | 0x0002 | 0x0004 | 0x0010 | 0x0020

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class TopologyError(RuntimeError):
    pass


# XDP_PASS in two instructions (r0 = 2; exit). See Namespace.attach_xdp_pass.
_XDP_PASS_INSNS = bytes.fromhex("b700000002000000" "9500000000000000")
_BPF_PROG_TYPE_XDP = 6
_XDP_FLAGS_DRV_MODE = 1 << 2
_libbpf: ctypes.CDLL | None = None


def _bpf() -> ctypes.CDLL:
    global _libbpf
    if _libbpf is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.bpf_prog_load.restype = ctypes.c_int
        lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
                                       ctypes.c_void_p]
        lib.bpf_xdp_attach.restype = ctypes.c_int
        _libbpf = lib
    return _libbpf


def netns_path(name: str) -> str:
    return os.path.join(pr_netns.NETNS_RUN_DIR, name)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_netns(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good (the whole process,
    if it has one thread: what an ``exec`` helper wants before execve)."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Call ``fn()`` in a thread that has joined network namespace ``name``.

    Sockets created by ``fn`` stay in that namespace after the thread ends; that is
    how callers get a socket "in" a namespace without moving the whole process.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns:{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _sysctl_path(key: str) -> str:
    # Interface names may contain dots; callers give those with '/' already.
    return "/proc/sys/" + key.replace(".", "/") if "/" not in key else "/proc/sys/" + key


def _split_cidr(cidr: str) -> tuple[str, int, int]:
    iface = ipaddress.ip_interface(cidr)
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    return str(iface.ip), iface.network.prefixlen, family


@dataclass
class Port:
    """One veth pair: ``ifname`` in the node namespace, ``peer`` on the bridge."""

    node: Namespace
    ifname: str
    peer: str
    bridge_ns: Namespace
    addresses: list[str] = field(default_factory=list)

    @property
    def ifindex(self) -> int:
        return self.node.ifindex(self.ifname)

    @property
    def mac(self) -> str:
        return self.node.mac(self.ifname)

    @property
    def peer_ifindex(self) -> int:
        return self.bridge_ns.ifindex(self.peer)


class Namespace:
    """A network namespace owned by a :class:`Topology` (or adopted by name)."""

    def __init__(self, topology: Topology | None, name: str, short: str):
        self.topology = topology
        self.name = name      # the real (unique) namespace name under /run/netns
        self.short = short    # the role name the topology was asked for
        self.bridge_ifname: str | None = None  # set when the namespace holds a bridge

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def path(self) -> str:
        return netns_path(self.name)

    # --- netlink -------------------------------------------------------------
    def ipr(self) -> NetNS:
        """A pyroute2 netlink handle in this namespace; use it as a context manager."""
        return NetNS(self.name)

    def ifindex(self, ifname: str) -> int:
        with self.ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise TopologyError(f"{self.name}: no interface {ifname!r}")
        return found[0]

    def mac(self, ifname: str) -> str:
        with self.ipr() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return link.get_attr("IFLA_ADDRESS")

    def link_up(self, ifname: str) -> None:
        with self.ipr() as ipr:
            ipr.link("set", index=self._index(ipr, ifname), state="up")

    def add_address(self, ifname: str, cidr: str) -> None:
        addr, plen, family = _split_cidr(cidr)
        with self.ipr() as ipr:
            kw: dict[str, Any] = {}
            if family == socket.AF_INET6:
                # Duplicate address detection would hold the address "tentative"
                # (unusable as a source) for a second or more; a lab has no duplicates.
                kw["flags"] = IFA_F_NODAD
            ipr.addr("add", index=self._index(ipr, ifname), address=addr,
                     prefixlen=plen, family=family, **kw)

    def addresses(self, ifname: str | None = None) -> list[str]:
        with self.ipr() as ipr:
            kw = {"index": self._index(ipr, ifname)} if ifname else {}
            return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(**kw)]

    def add_route(self, dst: str, *, gateway: str | None = None,
                  ifname: str | None = None,
                  multipath: Sequence[str] | None = None) -> None:
        """Add a route; ``multipath`` is a list of gateways for one ECMP route."""
        net = ipaddress.ip_network(dst, strict=False)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        kw: dict[str, Any] = {"dst": str(net), "family": family}
        with self.ipr() as ipr:
            if multipath:
                kw["multipath"] = [{"gateway": g} for g in multipath]
            elif gateway:
                kw["gateway"] = gateway
            if ifname:
                kw["oif"] = self._index(ipr, ifname)
            ipr.route("add", **kw)

    def set_next_hops(self, dst: str, gateways: Sequence[str]) -> None:
        """Make ``dst``'s route go through ``gateways`` (ECMP when more than one),
        replacing the route in one netlink call so no packet finds none."""
        if not gateways:
            raise TopologyError(f"{self.name}: no next hop for {dst}")
        net = ipaddress.ip_network(dst, strict=False)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        kw: dict[str, Any] = {"dst": str(net), "family": family}
        if len(gateways) == 1:
            kw["gateway"] = gateways[0]
        else:
            kw["multipath"] = [{"gateway": g} for g in gateways]
        with self.ipr() as ipr:
            ipr.route("replace", **kw)

    def routes(self, dst: str) -> list[Any]:
        net = ipaddress.ip_network(dst, strict=False)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        with self.ipr() as ipr:
            return [r for r in ipr.get_routes(family=family)
                    if r.get_attr("RTA_DST") == str(net.network_address)
                    and r["dst_len"] == net.prefixlen]

    def neighbours(self, ifname: str | None = None) -> list[tuple[str, str | None, int]]:
        """(address, lladdr, NUD state) of the neighbour table."""
        with self.ipr() as ipr:
            kw = {"ifindex": self._index(ipr, ifname)} if ifname else {}
            return [(n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"), n["state"])
                    for n in ipr.get_neighbours(**kw)]

    @staticmethod
    def _index(ipr: NetNS, ifname: str) -> int:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise TopologyError(f"no interface {ifname!r}")
        return found[0]

    # --- non-netlink, via a thread inside the namespace ----------------------
    def run(self, fn: Callable[[], T]) -> T:
        return run_in_netns(self.name, fn)

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (``value`` None) or write a sysctl of this namespace."""
        path = _sysctl_path(key)

        def op() -> str:
            if value is not None:
                with open(path, "w") as f:
                    f.write(str(value))
            with open(path) as f:
                return f.read().strip()

        return self.run(op)

    def socket(self, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        return self.run(lambda: socket.socket(family, type, proto))

    def netns_cookie(self) -> int:
        """The kernel's cookie for this namespace, as BPF programs see it."""
        s = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            return int.from_bytes(
                s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        finally:
            s.close()

    def attach_xdp_pass(self, ifname: str) -> None:
        """Attach a native-mode XDP program that passes everything.

        A frame that a native XDP program on one end of a veth sends with XDP_TX (or
        redirects into a veth) is delivered only if the receiving end runs NAPI,
        which on this kernel takes an XDP program there; without one the frame is
        dropped silently. Real NICs have no such condition, so the lab gives each
        bridge-side veth this no-op program. It lives until the device does.
        """
        lib = _bpf()
        insns = ctypes.create_string_buffer(_XDP_PASS_INSNS, len(_XDP_PASS_INSNS))
        fd = lib.bpf_prog_load(_BPF_PROG_TYPE_XDP, b"mlb_lab_pass", b"GPL", insns,
                               len(_XDP_PASS_INSNS) // 8, None)
        if fd < 0:
            raise OSError(-fd, f"bpf_prog_load(lab XDP pass): {os.strerror(-fd)}")
        try:
            idx = self.ifindex(ifname)
            # bpf_xdp_attach talks netlink in the calling thread's namespace.
            ret = self.run(lambda: lib.bpf_xdp_attach(idx, fd, _XDP_FLAGS_DRV_MODE, None))
            if ret < 0:
                raise OSError(-ret, f"{self.name}: XDP attach on {ifname}: "
                                    f"{os.strerror(-ret)}")
        finally:
            os.close(fd)  # the attachment holds its own reference

    def set_tx_checksum(self, ifname: str, enable: bool) -> None:
        """Toggle transmit checksum offload.

        A veth hands a locally sent TCP segment on with only the pseudo-header
        summed (CHECKSUM_PARTIAL), trusting the receiver to know. Once a native XDP
        program has turned the packet into a raw frame (XDP_TX, redirect) that
        knowledge is gone and the receiver drops it for a bad checksum. Lab nodes
        whose packets cross a native-mode balancer therefore send full checksums,
        as they would through a real NIC.
        """

        self._set_features(ifname, lambda name: name.startswith("tx-checksum"), enable)

    def set_tx_vlan_insert(self, ifname: str, enable: bool) -> None:
        """Toggle transmit VLAN tag insertion offload.

        A bridge takes the outer VLAN tag of every frame it receives into the skb's
        metadata, and a veth with tag insertion "offloaded" hands it on that way: the
        XDP program at the other end then sees a frame without that tag. A real
        switch puts the tag on the wire, so the lab's bridge ports towards
        balancers insert it into the frame (the kernel does, when the device says it
        cannot).
        """
        self._set_features(ifname, lambda name: name in ("tx-vlan-hw-insert", "tx-vlan-stag-hw-insert"), enable)

    def _set_features(self, ifname: str, pick: Callable[[str], bool], enable: bool) -> None:
        def op() -> None:
            eth = Ethtool()
            try:
                feats = eth.get_features(ifname)
                for name, feat in feats.features.items():
                    if pick(name) and feat.available:
                        feat.enable = enable
                eth.set_features(ifname, feats)
            finally:
                eth.close()

        self.run(op)

    def features(self, ifname: str) -> dict[str, bool]:
        def op() -> dict[str, bool]:
            eth = Ethtool()
            try:
                return {n: bool(f.enable) for n, f in eth.get_features(ifname).features.items()}
            finally:
                eth.close()

        return self.run(op)

    def tx_checksum(self, ifname: str) -> bool:
        def op() -> bool:
            eth = Ethtool()
            try:
                feats = eth.get_features(ifname).features
                return any(f.enable for n, f in feats.items() if n.startswith("tx-checksum"))
            finally:
                eth.close()

        return self.run(op)

    def xdp_prog_id(self, ifname: str) -> int | None:
        """Id of the XDP program attached to ``ifname``, or None."""
        with self.ipr() as ipr:
            link = ipr.get_links(self._index(ipr, ifname))[0]
        xdp = link.get_attr("IFLA_XDP")
        if not xdp:
            return None
        return xdp.get_attr("IFLA_XDP_PROG_ID") or None

    # --- processes -----------------------------------------------------------
    def popen(self, argv: Sequence[str], *, cgroup: str | os.PathLike | None = None,
              **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside this namespace (and, given one, in the cgroup v2
        directory ``cgroup``, with everything it forks); the topology kills it on
        teardown."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        procs = -1
        try:
            if cgroup is not None:
                procs = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise

        def enter() -> None:
            # Runs in the child between fork and exec; the fds were inherited.
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(127)
            if procs >= 0:
                os.write(procs, b"0")  # "0": the writing process itself

        try:
            proc = subprocess.Popen(list(argv), preexec_fn=enter, **kw)
        finally:
            os.close(fd)
            if procs >= 0:
                os.close(procs)
        if self.topology is not None:
            self.topology._record(f"process {proc.pid}", lambda: _stop(proc))
        return proc

    def check_output(self, argv: Sequence[str], timeout: float = 30, **kw: Any) -> str:
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), out, err)
        return out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=3)


class Topology:
    """A set of namespaces and links with one owner and one teardown.

    ``prefix`` makes every namespace name unique (the default contains the pid), so
    concurrent users on one machine never collide. Interfaces are created inside the
    topology's own namespaces, so their names cannot collide with anyone's.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"mlb{os.getpid()}"
        self.namespaces: dict[str, Namespace] = {}
        self.ports: list[Port] = []
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _record(self, what: str, undo: Callable[[], None]) -> None:
        with self._lock:
            self._undo.append((what, undo))

    def __getitem__(self, short: str) -> Namespace:
        return self.namespaces[short]

    # --- building ------------------------------------------------------------
    def add_namespace(self, short: str) -> Namespace:
        if short in self.namespaces:
            raise TopologyError(f"namespace {short!r} already exists")
        name = f"{self.prefix}-{short}"
        if os.path.exists(netns_path(name)):
            raise TopologyError(f"namespace {name!r} exists already (not ours)")
        pr_netns.create(name)
        self._record(f"netns {name}", lambda: pr_netns.remove(name))
        ns = Namespace(self, name, short)
        self.namespaces[short] = ns
        ns.link_up("lo")
        # Off before any interface exists, so that no address ever goes tentative.
        for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
            ns.sysctl(key, 0)
        return ns

    def add_bridge(self, short: str = "br", ifname: str = "br0") -> Namespace:
        """A namespace holding only a bridge; node ports are plugged into it."""
        ns = self.add_namespace(short)
        # With br_netfilter loaded on the host (Docker does that), bridged frames
        # would traverse this namespace's netfilter hooks; the lab's bridge is a
        # plain switch, whatever the host runs.
        for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables",
                    "bridge-nf-call-arptables"):
            try:
                ns.sysctl(f"net/bridge/{key}", 0)
            except FileNotFoundError:
                pass  # br_netfilter not loaded: nothing to turn off
        with ns.ipr() as ipr:
            ipr.link("add", ifname=ifname, kind="bridge")
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, state="up")
        ns.bridge_ifname = ifname
        return ns

    def connect(self, node: Namespace | str, bridge: Namespace | str, *,
                ifname: str = "eth0", addresses: Iterable[str] = (),
                mac: str | None = None, peer_xdp_pass: bool = False, tx_checksum: bool = True) -> Port:
        """Join ``node`` to ``bridge`` with a veth pair and address the node end.

        For a node whose traffic crosses a native-mode XDP balancer on veth, pass
        ``peer_xdp_pass=True`` (on the balancer's port; it also makes that port put
        VLAN tags into frames) and ``tx_checksum=False`` (on every port): see
        :meth:`Namespace.attach_xdp_pass`, :meth:`Namespace.set_tx_vlan_insert` and
        :meth:`Namespace.set_tx_checksum` for why.
        """
        node = self._ns(node)
        bridge = self._ns(bridge)
        br_if = bridge.bridge_ifname
        if br_if is None:
            raise TopologyError(f"{bridge.name} holds no bridge")
        peer = f"p-{node.short}"[:15]
        with node.ipr() as ipr:
            peer_spec = {"ifname": peer, "net_ns_fd": bridge.name}
            kw: dict[str, Any] = {}
            if mac:
                kw["address"] = mac
            ipr.link("add", ifname=ifname, kind="veth", peer=peer_spec, **kw)
        # Removing the namespaces removes veths anyway; this undo matters only when
        # a namespace outlives the topology (e.g. adopted ones).
        self._record(f"veth {node.name}/{ifname}",
                     lambda: _delete_link(node, ifname))
        with bridge.ipr() as ipr:
            pidx = ipr.link_lookup(ifname=peer)[0]
            bidx = ipr.link_lookup(ifname=br_if)[0]
            ipr.link("set", index=pidx, master=bidx)
            ipr.link("set", index=pidx, state="up")
        if peer_xdp_pass:
            bridge.attach_xdp_pass(peer)
            bridge.set_tx_vlan_insert(peer, False)
        if not tx_checksum:
            node.set_tx_checksum(ifname, False)
        node.link_up(ifname)
        port = Port(node=node, ifname=ifname, peer=peer, bridge_ns=bridge)
        for cidr in addresses:
            node.add_address(ifname, cidr)
            port.addresses.append(cidr)
        self.ports.append(port)
        return port

    def link_pair(self, a: Namespace | str, b: Namespace | str, *, a_ifname: str, b_ifname: str,
                  a_addresses: Iterable[str] = (), b_addresses: Iterable[str] = (),
                  tx_checksum: bool = True) -> None:
        """A veth pair straight between two namespaces (no bridge), addressed on both ends."""
        a, b = self._ns(a), self._ns(b)
        with a.ipr() as ipr:
            ipr.link("add", ifname=a_ifname, kind="veth", peer={"ifname": b_ifname, "net_ns_fd": b.name})
        self._record(f"veth {a.name}/{a_ifname}", lambda: _delete_link(a, a_ifname))
        for ns, ifname, addresses in ((a, a_ifname, a_addresses), (b, b_ifname, b_addresses)):
            if not tx_checksum:
                ns.set_tx_checksum(ifname, False)
            ns.link_up(ifname)
            for cidr in addresses:
                ns.add_address(ifname, cidr)

    def add_loopback_vip(self, node: Namespace | str, vip: str,
                         ifnames: Iterable[str] = ("eth0",)) -> None:
        """Put ``vip`` on the node's loopback, hidden from ARP (DR / mix mode).

        Every mix holds the VIP so that its applications accept packets addressed to
        it, but only the route (or the balancer) decides who receives them: the node
        must neither answer ARP for it (arp_ignore=1) nor use it as the source of its
        own ARP requests (arp_announce=2).
        """
        node = self._ns(node)
        ip = ipaddress.ip_address(vip)
        if ip.version == 4:
            for dev in ("all", *ifnames):
                node.sysctl(f"net/ipv4/conf/{dev}/arp_ignore", 1)
                node.sysctl(f"net/ipv4/conf/{dev}/arp_announce", 2)
            node.add_address("lo", f"{vip}/32")
        else:
            # Neighbour discovery only answers for addresses on the asking interface,
            # so a /128 on lo is already invisible to the LAN.
            node.add_address("lo", f"{vip}/128")

    def enable_l4_multipath_hash(self, node: Namespace | str) -> None:
        """Hash ECMP next hops on the 5-tuple read from each packet.

        Policy 3 (custom fields), not 1: policy 1 takes a forwarded packet's hash from
        the skb when the sender left one there, and a TCP sender's skb hash is its
        socket's random txhash, which it changes after a retransmission timeout, while
        its TIME_WAIT answers carry none. One flow would then reach two mixes. The
        fields below are read from the headers, so every packet of a flow hashes alike.
        """
        node = self._ns(node)
        for fam in ("ipv4", "ipv6"):
            node.sysctl(f"net.{fam}.fib_multipath_hash_fields", L4_HASH_FIELDS)
            node.sysctl(f"net.{fam}.fib_multipath_hash_policy", 3)

    def enable_forwarding(self, node: Namespace | str) -> None:
        """Turn on forwarding for the namespace and each of its interfaces.

        Per interface too: a new namespace may copy "all" from the host's
        (devconf_inherit_init_net) while its interfaces start from "default", and
        writing "all" only propagates on a change. bpf_fib_lookup checks the
        ingress interface's own setting.
        """
        node = self._ns(node)
        with node.ipr() as ipr:
            names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
        for fam in ("ipv4", "ipv6"):
            for dev in ("all", "default", *names):
                node.sysctl(f"net/{fam}/conf/{dev}/forwarding", 1)
        node.sysctl("net.ipv4.ip_forward", 1)

    def _ns(self, ns: Namespace | str) -> Namespace:
        return self.namespaces[ns] if isinstance(ns, str) else ns

    # --- teardown ------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Undo everything in reverse; return (not raise) what could not be undone."""
        with self._lock:
            undo, self._undo = self._undo, []
        failures: list[str] = []
        for what, fn in reversed(undo):
            try:
                fn()
            except FileNotFoundError:
                pass  # already gone (e.g. a veth removed with its namespace)
            except Exception as exc:  # keep going: leave as little behind as possible
                if "No such device" in str(exc) or "No such file" in str(exc):
                    continue
                failures.append(f"{what}: {exc!r}")
        self.namespaces.clear()
        self.ports.clear()
        return failures


def _delete_link(ns: Namespace, ifname: str) -> None:
    if not os.path.exists(ns.path):
        return
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])

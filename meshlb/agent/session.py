"""The data-plane session of one agent: what it loads, attaches and changes on the host,
and how that ends.

Opening loads the balancer (adopting its pinned maps after a restart), swaps its program
into the pinned XDP link or attaches a new one, adopts or loads the socket-release
tracer with its sock_ops hook, sets the SNAT sources, opens the pinned eviction marks and
turns on the sysctls bpf_fib_lookup needs. Each step registers its undo on one exit
stack as it succeeds. A session ends one of two ways: keeping its pins (an error or a
restart: forwarding and conntrack carry on, and the next agent adopts them), or
unpinning everything (a leave: the host is left as the agent found it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from meshlb import vipnet
from meshlb.config import DEFAULT_SNAT_PORTS, Config, VipConfig
from meshlb.dataplane import bpffs
from meshlb.dataplane.balancer import Balancer
from meshlb.dataplane.libbpf import BpfError, Link
from meshlb.dataplane.marks import MarkStore
from meshlb.dataplane.mounts import cgroup2_root
from meshlb.dataplane.tracer import Tracer

log = logging.getLogger(__name__)

XDP_LINK_PIN = "xdp_link"
TRACER_SUBDIR = "tracer"
MARKS_PIN = "eviction_marks"
MARKS_MAX = 65536  # origins; allocated as used
XDP_MODES = {"native": ("native",), "generic": ("generic",), "auto": ("native", "generic")}


def attach_sockops(tracer: Tracer, setting: str, source: str) -> None:
    """The sock_ops half of the tracer (bpf/tracer.bpf.c says why it exists) on the
    cgroup ``setting`` names (conntrack.sockops_cgroup of the file ``source``). A host
    without cgroup v2 runs with the tracepoint alone, and says so."""
    if setting == "off":
        return
    path = cgroup2_root() if setting == "auto" else setting
    if path is None:
        log.warning("no cgroup v2 hierarchy mounted: socket closes come from the tracepoint alone, "
                    "which the kernel does not run for every close (conntrack.sockops_cgroup)")
        return
    try:
        tracer.attach_cgroup(path)
    except BpfError as exc:
        if setting != "auto":
            raise RuntimeError(f"{source}: conntrack.sockops_cgroup: {exc}") from None
        log.warning("cannot attach the sock_ops hook to %s (%s): socket closes come from the "
                    "tracepoint alone", path, exc)
        return
    log.info("socket closes also reported from sock_ops on cgroup %s", path)


class Session:
    """One agent's hold on the data plane. ``open()`` it, ``serve()`` VIPs, and
    ``close(unpin=...)`` it once."""

    balancer: Balancer
    tracer: Tracer
    marks: MarkStore

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.name = cfg.node.name
        self.iface = cfg.node.iface or ""
        self.ifindex = 0
        self.pin = Path(cfg.node.pin_dir)
        self.address = ""  # advertised address: the node's identity in the data plane
        self.data_addresses: list[str] = []  # the interface's: IPv6 VIPs go to an IPv6 one
        self.adopted = False  # the balancer's maps were pinned by a previous agent
        self.xdp_mode = ""
        self.snat_ports = DEFAULT_SNAT_PORTS
        self.restored_marks: dict[str, tuple[int, int]] = {}  # origin -> (epoch, contiguous)
        self.loopback: list[str] = []  # VIP addresses this session put on lo
        self.neighbour_link: Link | None = None  # None: no tcx, next hops solicited instead
        self._undo = contextlib.ExitStack()
        self._leaving = False

    # ------------------------------------------------------------------ opening

    def open(self) -> None:
        """Load or adopt everything; on failure, what was opened is closed again (pins
        stay) and the error raised."""
        try:
            self._open()
        except BaseException:
            self.close(unpin=False)
            raise

    def _open(self) -> None:
        cfg = self.cfg
        try:
            bpffs.ensure_for(self.pin)
        except OSError as exc:
            raise RuntimeError(str(exc)) from None
        self._on_close("remove the pin directory", self.pin.rmdir, leave=True)
        self.ifindex = vipnet.ifindex(self.iface)
        self.data_addresses = vipnet.interface_addresses(self.iface)
        self.address = cfg.node.advertise.host if cfg.node.advertise else self.data_addresses[0]
        self.adopted = (self.pin / "conntrack").exists()
        self.balancer = Balancer.load(pin_dir=self.pin, conntrack_size=cfg.conntrack.max_entries)
        self._on_close("close the balancer", self.balancer.close)
        self._on_close("unpin the balancer", self.balancer.unpin, leave=True)
        off = vipnet.disable_vlan_offload(self.iface)
        if off:
            log.info("turned off %s on %s so XDP sees VLAN tags", ", ".join(off), self.iface)
        self._attach_xdp()
        self._hand_over_neighbours()
        self._open_tracer()
        self._configure_snat()
        self._open_marks()
        vipnet.set_arp_sysctls(self.iface)
        changed = vipnet.enable_forwarding(self.iface)
        self._on_close("restore sysctls", vipnet.restore_sysctls, changed, leave=True)
        if changed:
            log.info("for bpf_fib_lookup: %s", ", ".join(f"{k.replace('/', '.')}=1" for k in changed
                                                         if k.endswith("forwarding")))
        # registered last, so undone first: addresses added by serve() as VIPs come
        self._on_close("remove VIP addresses from lo", lambda: vipnet.remove_loopback_vips(self.loopback),
                       leave=True)

    def _attach_xdp(self) -> None:
        link_pin = self.pin / XDP_LINK_PIN
        adopted = self._adopt_xdp_link(link_pin) if link_pin.exists() else None
        link = adopted if adopted is not None else self._new_xdp_link()
        self._on_close("close the XDP link", link.close)
        if adopted is None:
            link.pin(str(link_pin))
        self._on_close("remove the XDP link's pin", os.unlink, link_pin, leave=True)
        self._on_close("detach XDP", link.detach, leave=True)

    def _hand_over_neighbours(self) -> None:
        """Packets whose next hop has no neighbour entry go to the kernel's own
        resolution through a tc program (bpf/balancer.bpf.c, "Unknown neighbours");
        where the kernel has no tcx links they are dropped, and the neighbour loop has
        the kernel resolve those next hops for the packets after them."""
        link = self.balancer.ensure_neighbour_handoff(self.ifindex)
        self.neighbour_link = link
        if link is None:
            log.warning("no tcx links in this kernel (Linux < 6.6): a packet whose next hop has no "
                        "neighbour entry is dropped while the kernel resolves it")
            return
        self._on_close("close the neighbour hand-off link", link.close)
        # before the pins go: the XDP program must stop handing packets to a program
        # that is about to be detached
        self._on_close("stop the neighbour hand-off", self.balancer.neighbour_handoff_off, self.ifindex,
                       leave=True)

    def _adopt_xdp_link(self, link_pin: Path) -> Link | None:
        old = Link.from_pinned(str(link_pin))
        try:
            # Swap the running program for the one just loaded (same pinned maps),
            # atomically: packets never see the interface without a program.
            old.update(self.balancer.program)
        except (BpfError, AttributeError) as exc:
            log.warning("cannot update the pinned XDP link (%s); re-attaching", exc)
            old.detach()
            old.close()
            os.unlink(link_pin)
            return None
        self.xdp_mode = "adopted"
        return old

    def _new_xdp_link(self) -> Link:
        modes = XDP_MODES[self.cfg.node.xdp_mode]
        errors = []
        for mode in modes:
            try:
                link = self.balancer.attach(self.ifindex, mode)
            except BpfError as exc:
                errors.append(f"{mode}: {exc}")
                if mode == "native" and len(modes) > 1:
                    log.warning("native XDP unavailable on %s (%s); falling back to generic mode", self.iface, exc)
                continue
            self.xdp_mode = mode
            return link
        raise RuntimeError(f"cannot attach XDP to {self.iface}: {'; '.join(errors)}")

    def _open_tracer(self) -> None:
        tdir = self.pin / TRACER_SUBDIR
        setting = self.cfg.conntrack.sockops_cgroup
        tracer = None
        if tdir.exists() and any(tdir.iterdir()):
            if not self.adopted:
                # a tracer left without the balancer's maps it evicts in: not ours to adopt
                log.warning("pinned tracer without a pinned balancer; loading a new one")
                Tracer(netns_cookie=0).unpin(tdir)
            else:
                try:
                    tracer = Tracer.adopt(tdir)
                except BpfError as exc:
                    log.warning("cannot adopt pinned tracer (%s); loading a new one", exc)
                    Tracer(netns_cookie=0).unpin(tdir)
        if tracer is None:
            tracer = Tracer(balancer_pins=self.pin)
            self._on_close("close the tracer", tracer.close)
            tracer.load()
            tracer.attach()
            attach_sockops(tracer, setting, self.cfg.source)
            tracer.pin(tdir)
        else:
            self._on_close("close the tracer", tracer.close)
            if not tracer.sockops_attached and setting != "off":
                log.warning("the adopted tracer has no sock_ops hook: closes come from the tracepoint "
                            "alone until the agent starts with a fresh tracer (meshlb leave, or remove %s)",
                            tdir)
        self._on_close("unpin the tracer", tracer.unpin, tdir, leave=True)
        self.tracer = tracer

    def _configure_snat(self) -> None:
        """One SNAT source per family for every nat VIP: the first nat VIP of that
        family that names an address or port range sets it, else the interface's
        address and the default range."""
        ranges = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            v6 = fam == socket.AF_INET6
            nat = [v for v in self.cfg.vips if v.mode == "nat" and (v.address.version == 6) == v6]
            if not nat:
                continue
            fam_addrs = [a for a in self.data_addresses if (":" in a) == v6]
            addr = next((str(v.snat_address) for v in nat if v.snat_address), fam_addrs[0] if fam_addrs else None)
            lo, hi = next((v.snat_ports for v in nat if v.snat_ports), DEFAULT_SNAT_PORTS)
            if addr is None:
                log.warning("nat VIPs of IPv%d but no IPv%d address on %s: they cannot forward",
                            6 if v6 else 4, 6 if v6 else 4, self.iface)
                continue
            self.balancer.set_snat(fam, addr, lo, hi)
            ranges.append((lo, hi))
        if ranges:
            self.snat_ports = (min(r[0] for r in ranges), max(r[1] for r in ranges))
            # the kernel must never pick a SNAT port for this node's own connections,
            # or the reply to one of them would be taken for a NAT flow
            with contextlib.suppress(OSError):
                Path("/proc/sys/net/ipv4/ip_local_reserved_ports").write_text(
                    ",".join(f"{a}-{b}" for a, b in sorted(set(ranges))))

    def _open_marks(self) -> None:
        path = self.pin / MARKS_PIN
        try:
            marks = MarkStore.open(path, MARKS_MAX)
        except BpfError as exc:
            log.warning("cannot adopt pinned eviction marks (%s); starting without", exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            marks = MarkStore.open(path, MARKS_MAX)
        self._on_close("close the eviction marks", marks.close)
        self._on_close("unpin the eviction marks", marks.unpin, leave=True)
        self.marks = marks
        # Marks describe the conntrack they were saved beside; a fresh map has no
        # flows that old evictions could concern.
        if self.adopted:
            self.restored_marks = marks.load()
            if self.restored_marks:
                log.info("resuming eviction numbering of %d origin(s) from the previous run",
                         len(self.restored_marks))

    # ------------------------------------------------------------------ VIPs

    def serve(self, vips: Iterable[VipConfig]) -> None:
        """Watch the VIPs' endpoints for closes and put their addresses on lo: dr VIPs
        must be local addresses to be accepted; a nat VIP whose chosen backend is this
        node is passed up unchanged, so it needs the same."""
        vips = list(vips)
        for vip in vips:
            self._watch(vip)
        new = [a for a in dict.fromkeys(str(v.address) for v in vips) if a not in self.loopback]
        self.loopback += vipnet.add_loopback_vips(new)

    def stop_serving(self, vip: VipConfig, remaining: Collection[VipConfig]) -> None:
        """Stop watching a VIP's endpoint; its address leaves lo unless one of the
        ``remaining`` VIPs has it too."""
        with contextlib.suppress(BpfError, ValueError):
            self.tracer.unwatch(vip.address, vip.port)
        addr = str(vip.address)
        if vip.address not in {v.address for v in remaining} and addr in self.loopback:
            vipnet.remove_loopback_vips([addr])
            self.loopback.remove(addr)

    def _watch(self, vip: VipConfig) -> None:
        if vip.protocol != "tcp":
            return
        # A listener's reset on a nat VIP answers a segment the balancer passed up for
        # want of a translation (a stray of a flow it forgot); its tuple may be a new
        # connection's by now, and evicting that one would take its reply translation.
        self.tracer.watch(vip.address, vip.port, listener_resets=vip.mode != "nat")
        if vip.mode == "nat":
            # the backend side of nat flows: only connections from SNAT source ports
            # (the range is cluster-wide) are balanced flows
            self.tracer.watch(self.address, vip.target_port, remote_ports=self.snat_ports)

    # ------------------------------------------------------------------ closing

    def close(self, *, unpin: bool) -> None:
        """End the session: keep the pins (forwarding carries on; the next agent adopts
        them) or, with ``unpin``, detach and unpin everything and undo the host changes.
        Every step runs; one that fails is logged."""
        self._leaving = unpin
        self._undo.close()
        if unpin:
            log.info("%s: detached and unpinned", self.name)

    def _on_close(self, what: str, fn: Callable[..., Any], *args: Any, leave: bool = False) -> None:
        """Register an undo step: always, or (``leave``) only when unpinning."""
        def step() -> None:
            if leave and not self._leaving:
                return
            try:
                fn(*args)
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001 - the remaining steps must run
                log.warning("%s: cannot %s: %s", self.name, what, exc)
        self._undo.callback(step)

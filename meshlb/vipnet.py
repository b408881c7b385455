"""VIPs on the node's loopback, and the ARP settings that go with them.

In direct-return mode a mix accepts packets addressed to the VIP because the VIP is
configured on ``lo``; replies leave with the VIP as source. The node must not answer
ARP (or announce) for the VIP on its real interfaces, or the L2 network would route
every client to whichever node answered last: ``arp_ignore=1`` answers only for
addresses on the receiving interface, ``arp_announce=2`` never uses a loopback address
as the ARP source. IPv6 VIPs are added with ``nodad`` so they are usable at once.

All netlink work goes through pyroute2.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("meshlb.vipnet")

_ARP_SYSCTLS = {
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
}
IFA_F_NODAD = 0x02


def _netlink(fn):
    """pyroute2's synchronous API drives an asyncio loop of its own, which cannot run
    inside the agent's; called from a running loop, the call goes to a short-lived
    thread (these are rare, millisecond operations: start, reload, leave)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        with ThreadPoolExecutor(1, thread_name_prefix="netlink") as ex:
            return ex.submit(fn, *args, **kwargs).result()

    return wrapper


def _sysctl(key: str, value: str | None = None) -> str:
    path = Path("/proc/sys") / key
    if value is not None:
        path.write_text(value)
        return value
    return path.read_text().strip()


def set_arp_sysctls(iface: str | None = None) -> dict[str, str]:
    """Apply the ARP settings (all, and the balancer's interface if named); returns old values."""
    keys = dict(_ARP_SYSCTLS)
    if iface:
        keys[f"net/ipv4/conf/{iface}/arp_ignore"] = "1"
        keys[f"net/ipv4/conf/{iface}/arp_announce"] = "2"
    old = {}
    for key, value in keys.items():
        try:
            old[key] = _sysctl(key)
            _sysctl(key, value)
        except OSError as exc:
            log.warning("cannot set %s=%s: %s", key, value, exc)
    return old


def enable_forwarding(iface: str) -> dict[str, str]:
    """bpf_fib_lookup refuses to route packets that arrived on a device without
    forwarding (the check is unconditional, output lookups included), so the balancer's
    interface needs it, as in every XDP balancer that forwards. Only that device is
    changed. IPv6 forwarding on one device does not make the host route (that needs
    "all"), but would make it ignore router advertisements there, so accept_ra=1 is
    raised to 2 to keep SLAAC working. Returns the old values for restore_sysctls."""
    wanted = {f"net/ipv4/conf/{iface}/forwarding": "1", f"net/ipv6/conf/{iface}/forwarding": "1"}
    try:
        if _sysctl(f"net/ipv6/conf/{iface}/accept_ra") == "1":
            wanted[f"net/ipv6/conf/{iface}/accept_ra"] = "2"
    except OSError:
        pass
    old = {}
    for key, value in wanted.items():
        try:
            current = _sysctl(key)
            if current != value:
                old[key] = current
                _sysctl(key, value)
        except OSError as exc:
            log.warning("cannot set %s=%s: %s", key, value, exc)
    return old


@_netlink
def disable_vlan_offload(iface: str) -> list[str]:
    """Turn off receive VLAN offloads on the balancer's interface: with them the
    device strips a tag into metadata before XDP runs, so the program would judge (and
    forward, untagged) a frame whose VLAN it never saw. Returns the features turned off."""
    from pyroute2 import Ethtool  # noqa: PLC0415

    names = ("rx-vlan-hw-parse", "rx-vlan-stag-hw-parse")
    eth = Ethtool()
    try:
        feats = eth.get_features(iface)
        changed = [n for n in names if n in feats.features and feats.features[n].enable
                   and feats.features[n].available]
        for n in changed:
            feats.features[n].enable = False
        if changed:
            eth.set_features(iface, feats)
        return changed
    except Exception as exc:  # a driver without these features: nothing to do
        log.warning("cannot read or change VLAN offloads on %s: %s", iface, exc)
        return []
    finally:
        eth.close()


def restore_sysctls(old: dict[str, str]) -> None:
    for key, value in old.items():
        try:
            _sysctl(key, value)
        except OSError as exc:
            log.warning("cannot restore %s=%s: %s", key, value, exc)


def _prefix(vip: str) -> tuple[int, str, int]:
    addr = ipaddress.ip_address(vip)
    return (2 if addr.version == 4 else 10), str(addr), (32 if addr.version == 4 else 128)


@_netlink
def add_loopback_vips(vips: list[str]) -> list[str]:
    """Add each VIP to lo; returns those that this call added (already present ones are left
    as they are and not returned, so removal later never takes an address we did not add)."""
    added = []
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for vip in vips:
            family, addr, plen = _prefix(vip)
            kwargs = {"flags": IFA_F_NODAD} if family == 10 else {}
            try:
                ipr.addr("add", index=lo, address=addr, prefixlen=plen, family=family, **kwargs)
                added.append(addr)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
    return added


@_netlink
def remove_loopback_vips(vips: list[str]) -> None:
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for vip in vips:
            family, addr, plen = _prefix(vip)
            try:
                ipr.addr("del", index=lo, address=addr, prefixlen=plen, family=family)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                    raise


@_netlink
def loopback_addresses() -> set[str]:
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo)}


@_netlink
def interface_addresses(iface: str) -> list[str]:
    """Addresses of an interface, IPv4 first (used for SNAT and as the advertise address)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if not idx:
            raise LookupError(f"no interface {iface}")
        addrs = [(a["family"], a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=idx[0])]
    v4 = [a for f, a in addrs if f == 2]
    v6 = [a for f, a in addrs if f == 10 and not a.startswith("fe80")]
    return v4 + v6


@_netlink
def ifindex(iface: str) -> int:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
    if not idx:
        raise LookupError(f"no interface {iface}")
    return idx[0]

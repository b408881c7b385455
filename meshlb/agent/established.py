"""How many TCP connections this node still serves, which a leave waits for (up to
drain.timeout_s) before it tells the cluster."""
from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from pathlib import Path

from meshlb.config import VipConfig

Endpoint = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def served_endpoints(vips: Iterable[VipConfig], address: str) -> set[Endpoint]:
    """Local ends of this node's balanced TCP connections: the VIPs (dr) and, for nat
    VIPs, the backend port on this node's address."""
    out: set[Endpoint] = set()
    for v in vips:
        if v.protocol == "tcp":
            out.add((v.address, v.port))
            if v.mode == "nat":
                out.add((ipaddress.ip_address(address), v.target_port))
    return out


def count_established(endpoints: Collection[Endpoint], proc_net: str = "/proc/net") -> int:
    """ESTABLISHED TCP sockets whose local end is one of ``endpoints``."""
    n = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(proc_net, name).read_text().splitlines()[1:]
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

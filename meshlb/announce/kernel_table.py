"""The VIP routes the agent hands to a BGP speaker: one route ``VIP/32 dev lo`` (``/128``
for IPv6) per announced VIP, in a kernel routing table of their own and marked with a
route protocol number of their own.

No policy rule points at the table, so its routes never steer a packet; the speaker
(BIRD's kernel protocol with ``learn``, FRR's ``import-table``) reads them over netlink
the moment they change. Kernel state is the announcement's memory: it outlives the
agent (a restarted agent finds what it announced) and dies with the host (after a reboot
nothing is announced until an agent has attached its data plane and adds routes).

Synchronous pyroute2 calls: callers on an event loop run them in a thread.
"""
from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


def _family(addr: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(addr)
    return (socket.AF_INET, 32) if ip.version == 4 else (socket.AF_INET6, 128)


class KernelVipTable:
    """Routes of protocol ``proto`` in table ``table``; others in the table are left alone."""

    def __init__(self, table: int, proto: int) -> None:
        if not 1 <= table < 2**32 or table in (253, 254, 255):
            raise ValueError(f"kernel table {table}: not a table of its own (1..2^32-1, not default/main/local)")
        if not 1 <= proto <= 255:
            raise ValueError(f"route protocol {proto}: expected 1..255")
        self.table = table
        self.proto = proto

    def read(self) -> set[str]:
        """The VIP addresses routed in the table now (canonical text)."""
        out: set[str] = set()
        with IPRoute() as ipr:
            for fam in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=fam, table=self.table):
                    if r["proto"] != self.proto or r.get_attr("RTA_TABLE", r["table"]) != self.table:
                        continue
                    dst = r.get_attr("RTA_DST")
                    if dst is not None and r["dst_len"] == (32 if fam == socket.AF_INET else 128):
                        out.add(str(ipaddress.ip_address(dst)))
        return out

    def sync(self, addresses: set[str] | frozenset[str]) -> tuple[list[str], list[str]]:
        """Make the table hold exactly ``addresses``; returns (added, removed).

        Removals first: a VIP that goes away must stop attracting traffic even when an
        addition fails."""
        want = {str(ipaddress.ip_address(a)) for a in addresses}
        have = self.read()
        removed = sorted(have - want)
        added = sorted(want - have)
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for addr in removed:
                self._route(ipr, "del", addr, lo)
            for addr in added:
                self._route(ipr, "add", addr, lo)
        return added, removed

    def flush(self) -> list[str]:
        return self.sync(set())[1]

    def _route(self, ipr: IPRoute, op: str, addr: str, lo: int) -> None:
        fam, plen = _family(addr)
        try:
            ipr.route(op, dst=addr, dst_len=plen, family=fam, oif=lo, table=self.table, proto=self.proto)
        except NetlinkError as exc:
            if op == "add" and exc.code == errno.EEXIST:
                return
            if op == "del" and exc.code in (errno.ESRCH, errno.ENOENT):
                return
            raise

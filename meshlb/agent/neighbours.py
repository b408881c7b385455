"""Neighbour warming: bpf_fib_lookup cannot resolve a neighbour itself, so the kernel's
neighbour entries of every live member address (IPv6 ones included; health checks use
the gossip address only) are kept fresh by sending them an empty datagram now and then.
A packet that meets a missing entry all the same is handed to the kernel's resolution
by a tc program; on kernels without one, the next hops it found missing are solicited."""
from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from meshlb.cluster.driver import GossipDriver
from meshlb.cluster.node import Status
from meshlb.dataplane.balancer import Balancer
from meshlb.dataplane.libbpf import BpfError

DISCARD_PORT = 9  # resolution is the point, not the datagram


async def warm_neighbours(driver: GossipDriver, name: str, interval: Callable[[], float]) -> None:
    """Forever: every ``interval()`` seconds (at least one), one datagram to each
    address of every alive or suspect member but ``name``."""
    socks: dict[int, socket.socket] = {}
    try:
        for fam in (socket.AF_INET, socket.AF_INET6):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setblocking(False)
            socks[fam] = s
        while True:
            for m in driver.members():
                if m.name == name or m.status not in (Status.ALIVE, Status.SUSPECT):
                    continue
                for addr in {m.address[0], *m.meta.addresses}:
                    if addr.lower().startswith("fe80"):
                        continue
                    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
                    with contextlib.suppress(OSError):
                        socks[fam].sendto(b"", (addr, DISCARD_PORT))
            await asyncio.sleep(max(1.0, interval()))
    finally:
        for s in socks.values():
            s.close()


SOLICIT_PERIOD_S = 0.2


async def solicit_unresolved(balancer: Balancer, period: float = SOLICIT_PERIOD_S) -> None:
    """Forever, on a kernel without the tc hand-off (no tcx links): every ``period``
    seconds, have the kernel resolve the next hops the data plane found without a
    neighbour entry (it dropped those packets; the ones after them find the entry)."""
    while True:
        await asyncio.sleep(period)
        with contextlib.suppress(BpfError, OSError):
            balancer.solicit_unresolved()

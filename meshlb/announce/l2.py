"""Announcement on one L2 segment: per VIP, exactly one live mix answers ARP (IPv4) and
neighbour solicitations (IPv6), its owner (``ownership.py`` says which).

Every mix keeps each VIP on ``lo`` with ``arp_ignore=1``/``arp_announce=2`` (see
``meshlb/vipnet.py``), so it accepts the VIP's packets but answers no ARP for it, and NDP
answers only for addresses of the asking interface. The owner also puts the VIP on its
data interface (IPv4 ``/32``; IPv6 ``/128 nodad``): the kernel then answers for it
there. A new owner tells the segment at once, with a gratuitous ARP or an unsolicited
neighbour advertisement repeated a few times (``garp.py``), so that clients' and
switches' caches move.

The held addresses are kernel state and outlive the agent: a restarted agent finds the
VIPs it held on the interface and keeps claiming them.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshlb.announce import garp, ownership
from meshlb.announce.interface import (
    EMPTY_VIEW,
    Announcer,
    ClusterView,
    ready_addresses,
    vip_address,
)
from meshlb.announce.settings import L2Settings

log = logging.getLogger("meshlb.announce.l2")

IFA_F_NODAD = 0x02


class InterfaceVips:
    """VIP addresses on the data interface (synchronous pyroute2; call from a thread)."""

    def __init__(self, iface: str) -> None:
        self.iface = iface

    def _index(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.iface)
        if not found:
            raise LookupError(f"no interface {self.iface}")
        return found[0]

    def mac(self) -> str:
        with IPRoute() as ipr:
            return ipr.get_links(self._index(ipr))[0].get_attr("IFLA_ADDRESS")

    def held(self, vips: Iterable[str]) -> set[str]:
        wanted = set(vips)
        with IPRoute() as ipr:
            idx = self._index(ipr)
            have = {str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))) for a in ipr.get_addr(index=idx)
                    if a["prefixlen"] in (32, 128)}
        return have & wanted

    def add(self, vip: str) -> None:
        ip = ipaddress.ip_address(vip)
        family, plen = (socket.AF_INET, 32) if ip.version == 4 else (socket.AF_INET6, 128)
        kw = {"flags": IFA_F_NODAD} if ip.version == 6 else {}
        with IPRoute() as ipr:
            try:
                ipr.addr("add", index=self._index(ipr), address=str(ip), prefixlen=plen, family=family, **kw)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    def remove(self, vip: str) -> None:
        ip = ipaddress.ip_address(vip)
        family, plen = (socket.AF_INET, 32) if ip.version == 4 else (socket.AF_INET6, 128)
        with IPRoute() as ipr:
            try:
                ipr.addr("del", index=self._index(ipr), address=str(ip), prefixlen=plen, family=family)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                    raise


class L2Announcer(Announcer):
    mode = "l2"

    def __init__(self, settings: L2Settings, *, name: str, iface: str = "", vips: Iterable[str] = ()) -> None:
        super().__init__(vips)
        self.settings = settings
        self.name = name
        self.iface = settings.iface or iface
        if not self.iface:
            raise ValueError("l2 announcement needs an interface")
        self.addresses = InterfaceVips(self.iface)
        self.sender = garp.FrameSender(self.iface)
        self._mac: str | None = None
        self._holding: frozenset[str] = frozenset()
        self._ready: frozenset[str] = frozenset()
        self._forwardable: frozenset[str] = frozenset()
        self._view = EMPTY_VIEW
        self._leaving = False
        self._conflicts: dict[str, list[str]] = {}
        self._error = ""
        self._lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task] = {}
        self._retry: asyncio.Task | None = None
        self.counters = {"acquired": 0, "released": 0, "announcements_sent": 0, "send_errors": 0, "errors": 0}

    @property
    def owned(self) -> frozenset[str]:
        return self._holding

    def _addresses(self) -> list[str]:
        return sorted({vip_address(k) for k in self.vips})

    # --- Announcer -----------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._mac = await asyncio.to_thread(self.addresses.mac)
            # what a previous agent held stays held and claimed, so a restart moves nothing
            self._holding = frozenset(await asyncio.to_thread(self.addresses.held, self._addresses()))
            if self._holding:
                log.info("announce: holding %s on %s from before", ", ".join(sorted(self._holding)), self.iface)
        except Exception as exc:
            self._failed(exc)
        self._retry = asyncio.get_running_loop().create_task(self._retry_errors(), name="announce-l2")

    async def update(self, forwardable: AbstractSet[str], view: ClusterView = EMPTY_VIEW) -> None:
        self._forwardable = frozenset(forwardable)
        self._view = view
        await self._apply()

    async def withdraw_all(self) -> None:
        self._leaving = True
        await self._apply()

    async def stop(self, keep: bool) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        for vip in list(self._tasks):
            await self._cancel_announcing(vip)
        if not keep:
            async with self._lock:
                for vip in sorted(self._holding):
                    try:
                        await asyncio.to_thread(self.addresses.remove, vip)
                        self.counters["released"] += 1
                    except Exception as exc:
                        self._failed(exc)
                self._holding = frozenset()
        self.sender.close()

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "iface": self.iface,
            "ready": sorted(self._ready),
            "owned": sorted(self._holding),
            "leaving": self._leaving,
            "conflicts": self._conflicts,
            "error": self._error,
            "counters": dict(self.counters),
        }

    # --- decisions and their effects --------------------------------------------------

    async def _apply(self) -> None:
        async with self._lock:
            vips = self._addresses()
            self._ready = frozenset() if self._leaving else ready_addresses(self.vips, self._forwardable)
            candidates = {m: frozenset(r) for m, r in self._view.ready.items() if m != self.name}
            candidates[self.name] = self._ready
            claims = {m: frozenset(c) for m, c in self._view.claims.items() if m != self.name}
            claims[self.name] = self._holding
            want = ownership.held(self.name, vips, candidates, claims, self._holding)
            self._conflicts = ownership.conflicts(vips, candidates, claims)
            holding = set(self._holding)
            failed = False
            for vip in sorted(holding - want):
                try:
                    await self._cancel_announcing(vip)
                    await asyncio.to_thread(self.addresses.remove, vip)
                except Exception as exc:
                    self._failed(exc)
                    failed = True
                    continue
                holding.discard(vip)
                self.counters["released"] += 1
                log.info("announce: released %s on %s", vip, self.iface)
            for vip in sorted(want - holding):
                try:
                    await asyncio.to_thread(self.addresses.add, vip)
                except Exception as exc:
                    self._failed(exc)
                    failed = True
                    continue
                holding.add(vip)
                self.counters["acquired"] += 1
                log.info("announce: took %s on %s", vip, self.iface)
                self._tasks[vip] = asyncio.get_running_loop().create_task(self._announce(vip), name=f"garp {vip}")
            self._holding = frozenset(holding)
            if not failed:
                self._error = ""

    async def _announce(self, vip: str) -> None:
        try:
            if self._mac is None:
                self._mac = await asyncio.to_thread(self.addresses.mac)
            frame = garp.announcement(self._mac, vip)
            for i in range(self.settings.announcements):
                if i:
                    await asyncio.sleep(self.settings.announce_interval)
                try:
                    self.sender.send(frame)
                    self.counters["announcements_sent"] += 1
                except OSError as exc:
                    self.counters["send_errors"] += 1
                    log.warning("announce: %s on %s: %s", vip, self.iface, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
        finally:
            if self._tasks.get(vip) is asyncio.current_task():
                del self._tasks[vip]

    async def _cancel_announcing(self, vip: str) -> None:
        task = self._tasks.pop(vip, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _failed(self, exc: Exception) -> None:
        self.counters["errors"] += 1
        msg = f"{self.iface}: {exc}"
        if msg != self._error:
            log.error("announce: %s (retrying)", msg)
        self._error = msg

    async def _retry_errors(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._error:
                try:
                    if self._mac is None:
                        self._mac = await asyncio.to_thread(self.addresses.mac)
                    await self._apply()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(exc)

"""Announcement mode ``none``: getting client packets to the mixes is the network's job
(static routes, an external speaker the operator drives, a load balancer in front)."""
from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from meshlb.announce.interface import (
    EMPTY_VIEW,
    Announcer,
    ClusterView,
    ready_addresses,
)


class NoAnnouncer(Announcer):
    mode = "none"

    def __init__(self, vips=()) -> None:
        super().__init__(vips)
        self._ready: frozenset[str] = frozenset()
        self._withdrawn = False

    async def update(self, forwardable: AbstractSet[str], view: ClusterView = EMPTY_VIEW) -> None:
        self._ready = frozenset() if self._withdrawn else ready_addresses(self.vips, forwardable)

    async def withdraw_all(self) -> None:
        self._withdrawn = True
        self._ready = frozenset()

    async def stop(self, keep: bool) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "ready": sorted(self._ready)}

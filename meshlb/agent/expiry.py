"""Conntrack expiry: the two backstops that need no socket close.

The idle sweep removes flows whose close was missed; the handshake timeout removes
entries of a SYN nobody finished (a client that gave up, a spoofed source). The scan
runs in a worker thread: a full map is a quarter million entries, tens of milliseconds
of Python even filtered on the raw bytes, and probes must not wait behind it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from meshlb.config import ConntrackConfig
from meshlb.dataplane.balancer import Balancer

log = logging.getLogger(__name__)


class ConntrackExpiry:
    """``settings`` is read on every round, so that a reload that switches either
    backstop on, off or to another period takes effect; ``counts`` gets ``swept`` and
    ``handshake_timeout``."""

    def __init__(self, balancer: Balancer, settings: Callable[[], ConntrackConfig], counts: Counter[str]) -> None:
        self.balancer = balancer
        self.settings = settings
        self.counts = counts

    async def run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            ct = self.settings()
            periods = [ct.sweep_interval_s] if ct.idle_timeout_s > 0 else []
            if ct.handshake_timeout_s > 0:
                periods.append(max(0.25, ct.handshake_timeout_s / 2))
            await asyncio.sleep(min(periods, default=1.0))
            ct = self.settings()
            sweep = ct.idle_timeout_s > 0 and time.monotonic() - last_sweep >= ct.sweep_interval_s
            if not sweep and ct.handshake_timeout_s <= 0:
                continue
            try:
                swept, expired = await asyncio.to_thread(
                    self.expire, int(ct.idle_timeout_s * 1e9) if sweep else 0, int(ct.handshake_timeout_s * 1e9))
                self.counts["swept"] += swept
                self.counts["handshake_timeout"] += expired
            except Exception:
                log.exception("conntrack expiry failed")
            if sweep:
                last_sweep = time.monotonic()

    def expire(self, idle_ns: int, handshake_ns: int) -> tuple[int, int]:
        """Remove entries idle longer than ``idle_ns`` and unfinished handshakes older
        than ``handshake_ns`` (0: not that kind); returns how many of each."""
        idle, half_open = self.balancer.conntrack_stale(time.monotonic_ns(), idle_ns, handshake_ns)
        return (self.balancer.conntrack_expire(idle) if idle else 0,
                self.balancer.conntrack_expire(half_open) if half_open else 0)

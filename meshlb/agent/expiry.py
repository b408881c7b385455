"""Conntrack expiry: the backstops that need no socket close.

The idle sweep removes flows whose close was missed; the handshake timeout removes
entries of a SYN nobody finished (a client that gave up, a spoofed source); the closing
timeout removes flows to real servers (backends that run no meshlb, so no tracer
reports their closes) once a FIN or RST went through and they have gone quiet. The scan
runs in a worker thread: a full map is a quarter million entries, tens of milliseconds
of Python even filtered on the raw bytes, and probes must not wait behind it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection

from meshlb.config import ConntrackConfig
from meshlb.dataplane.balancer import Balancer

log = logging.getLogger(__name__)


class ConntrackExpiry:
    """``settings`` is read on every round, so that a reload that switches a backstop
    on, off or to another period takes effect; ``counts`` gets ``swept``,
    ``handshake_timeout`` and ``closing_timeout``. ``closing_backends`` is the set of
    backend ids whose closes no tracer reports (table sync keeps it current)."""

    def __init__(self, balancer: Balancer, settings: Callable[[], ConntrackConfig], counts: Counter[str],
                 closing_backends: Collection[int] = ()) -> None:
        self.balancer = balancer
        self.settings = settings
        self.counts = counts
        self.closing_backends = closing_backends

    async def run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            ct = self.settings()
            periods = [ct.sweep_interval_s] if ct.idle_timeout_s > 0 else []
            for timeout in (ct.handshake_timeout_s, ct.closing_timeout_s):
                if timeout > 0:
                    periods.append(max(0.25, timeout / 2))
            await asyncio.sleep(min(periods, default=1.0))
            ct = self.settings()
            sweep = ct.idle_timeout_s > 0 and time.monotonic() - last_sweep >= ct.sweep_interval_s
            closing = ct.closing_timeout_s > 0 and bool(self.closing_backends)
            if not sweep and ct.handshake_timeout_s <= 0 and not closing:
                continue
            try:
                # the ids copied here, on the loop that changes them
                swept, expired, closed = await asyncio.to_thread(
                    self.expire, int(ct.idle_timeout_s * 1e9) if sweep else 0, int(ct.handshake_timeout_s * 1e9),
                    int(ct.closing_timeout_s * 1e9) if closing else 0, frozenset(self.closing_backends))
                self.counts["swept"] += swept
                self.counts["handshake_timeout"] += expired
                self.counts["closing_timeout"] += closed
            except Exception:
                log.exception("conntrack expiry failed")
            if sweep:
                last_sweep = time.monotonic()

    def expire(self, idle_ns: int, handshake_ns: int, closing_ns: int = 0,
               closing_backends: Collection[int] = ()) -> tuple[int, int, int]:
        """Remove entries idle longer than ``idle_ns``, unfinished handshakes older
        than ``handshake_ns`` and closing flows of ``closing_backends`` quiet for
        ``closing_ns`` (0: not that kind); returns how many of each."""
        idle, half_open, closing = self.balancer.conntrack_stale(
            time.monotonic_ns(), idle_ns, handshake_ns, closing_ns, closing_backends)
        expire = self.balancer.conntrack_expire
        return (expire(idle) if idle else 0, expire(half_open) if half_open else 0,
                expire(closing) if closing else 0)

"""Backend health checks: TCP connect or HTTP GET, with rise/fall hysteresis.

The agent checks the application port of every member it may forward to. A passing check
is not the only product: the TCP handshake makes the kernel resolve the member's MAC
address (ARP for IPv4, neighbour discovery for IPv6) and keep it in the neighbour table.
The XDP program finds next-hop MACs with ``bpf_fib_lookup``, which can read that table but
cannot trigger a resolution itself; a member never talked to from user space would come
back ``BPF_FIB_LKUP_RET_NO_NEIGH`` and its flows could not be forwarded. Regular checks
keep those entries fresh as well.

Results are kept per target with hysteresis: a target flips down only after ``fall``
consecutive failures and up only after ``rise`` consecutive successes, so one lost SYN
does not reshuffle a Maglev table. The very first result is taken as is, so a fresh agent
does not wait ``rise`` intervals to start forwarding to healthy members.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

__all__ = ["CheckFailed", "TargetStatus", "HealthChecker", "tcp_check", "http_check"]

_MAX_STATUS_LINE = 1024


class CheckFailed(Exception):
    """A check did not pass; the message is the one-line reason kept as last_error."""


def _reason(exc: OSError) -> str:
    # asyncio wraps connect errors as "Connect call failed (addr)"; the errno is the news
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def tcp_check(host: str, port: int, timeout: float) -> None:
    """Pass when a TCP connection to (host, port) is established within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        raise CheckFailed(f"connect timed out after {timeout:g}s") from None
    except OSError as exc:
        raise CheckFailed(f"connect failed: {_reason(exc)}") from None
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        # a reset on close says nothing about whether the backend accepts connections
        pass


async def http_check(host: str, port: int, timeout: float, path: str = "/", host_header: str | None = None) -> int:
    """Pass when ``GET path`` answers 2xx or 3xx within ``timeout``; returns the status."""
    hh = host_header or (f"[{host}]" if ":" in host else host)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {hh}:{port}\r\nUser-Agent: meshlb-health\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            line = await reader.readuntil(b"\n")
    except TimeoutError:
        raise CheckFailed(f"HTTP timed out after {timeout:g}s") from None
    except asyncio.IncompleteReadError as exc:
        raise CheckFailed("HTTP connection closed before a status line" if not exc.partial else "HTTP status line truncated") from None
    except asyncio.LimitOverrunError:
        raise CheckFailed("HTTP status line too long") from None
    except OSError as exc:
        raise CheckFailed(f"HTTP connect failed: {_reason(exc)}") from None
    finally:
        if writer is not None:
            writer.close()
    parts = line[:_MAX_STATUS_LINE].decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise CheckFailed(f"not an HTTP status line: {line[:60]!r}")
    status = int(parts[1])
    if not 200 <= status < 400:
        raise CheckFailed(f"HTTP {status}")
    return status


@dataclass(frozen=True)
class TargetStatus:
    """Current view of one target.

    ``ok`` is the hysteresis-filtered state (False until the first check completes;
    ``checks`` tells whether one has). ``changed_at`` is the wall-clock time of the last
    flip, ``latency`` the duration of the last successful check in seconds, ``last_error``
    the reason of the last failed check (kept after recovery, for diagnosis).
    """

    addr: str
    port: int
    ok: bool = False
    checks: int = 0
    changed_at: float | None = None
    last_error: str | None = None
    latency: float | None = None
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive


# (name, ok): plain functions or coroutine functions
Callback = Callable[[str, bool], "Awaitable[None] | None"]


async def _call(fn: Callback, name: str, ok: bool) -> None:
    res = fn(name, ok)
    if inspect.isawaitable(res):
        await res


class HealthChecker:
    """Check a set of targets (name -> (addr, port)) every ``interval`` seconds.

    Each target runs its own loop, started at a random point of the first interval and
    then spaced ``interval * (1 ± jitter)``, so checks from many mixes do not arrive in
    bursts. ``on_change(name, ok)`` is called whenever a target's ``ok`` flips, including
    its first result; ``on_result(name, passed)`` after every check (for counters).
    Either may be a plain or a coroutine function; ``result(name)`` has the details.
    """

    def __init__(
        self,
        targets: Mapping[str, tuple[str, int]] | None = None,
        *,
        interval: float = 2.0,
        timeout: float = 1.0,
        kind: str = "tcp",
        http_path: str = "/",
        rise: int = 2,
        fall: int = 3,
        jitter: float = 0.1,
        on_change: Callback | None = None,
        on_result: Callback | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ):
        self._set_params(interval, timeout, kind, http_path, rise, fall, jitter)
        self.on_change = on_change
        self.on_result = on_result
        self._clock = clock
        self._rng = rng or random.Random()
        self._status: dict[str, TargetStatus] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._running = False
        self.set_targets(targets or {})

    @classmethod
    def from_config(cls, cfg, **kwargs) -> HealthChecker:
        """From a :class:`meshlb.config.HealthConfig`; kwargs as for the constructor."""
        return cls(interval=cfg.interval, timeout=cfg.timeout, kind=cfg.kind, http_path=cfg.http_path,
                   rise=cfg.rise, fall=cfg.fall, **kwargs)

    def _set_params(self, interval, timeout, kind, http_path, rise, fall, jitter) -> None:
        if kind not in ("tcp", "http"):
            raise ValueError(f"health check kind must be 'tcp' or 'http', got {kind!r}")
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.interval = interval
        self.timeout = timeout
        self.kind = kind
        self.http_path = http_path
        self.rise = rise
        self.fall = fall
        self.jitter = jitter

    def reconfigure(self, cfg) -> None:
        """Apply a new HealthConfig live. Current states and counters are kept (a target
        does not flap because of a reload); running loops use the new interval from their
        next sleep on."""
        self._set_params(cfg.interval, cfg.timeout, cfg.kind, cfg.http_path, cfg.rise, cfg.fall, self.jitter)

    # -- state ---------------------------------------------------------------------

    def results(self) -> dict[str, TargetStatus]:
        return dict(self._status)

    def result(self, name: str) -> TargetStatus | None:
        return self._status.get(name)

    def healthy(self) -> set[str]:
        return {n for n, s in self._status.items() if s.ok}

    def set_targets(self, targets: Mapping[str, tuple[str, int]]) -> None:
        """Replace the target set. Unchanged targets keep their state; a target whose
        address changed starts afresh."""
        for name in list(self._status):
            if name not in targets or targets[name] != (self._status[name].addr, self._status[name].port):
                del self._status[name]
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
        for name, (addr, port) in targets.items():
            if name not in self._status:
                self._status[name] = TargetStatus(addr=addr, port=port)
                if self._running:
                    self._spawn(name)

    # -- checking ------------------------------------------------------------------

    async def _probe(self, addr: str, port: int) -> None:
        if self.kind == "http":
            await http_check(addr, port, self.timeout, self.http_path)
        else:
            await tcp_check(addr, port, self.timeout)

    async def check_once(self, name: str) -> TargetStatus:
        """Run one check of ``name`` now, apply hysteresis, fire on_change on a flip."""
        st = self._status[name]
        start = time.monotonic()
        error: str | None = None
        try:
            await self._probe(st.addr, st.port)
        except CheckFailed as exc:
            error = str(exc)
        elapsed = time.monotonic() - start
        cur = self._status.get(name)
        if cur is None or (cur.addr, cur.port) != (st.addr, st.port):
            return st  # target removed or readdressed while we were checking

        if error is None:
            succ, fail = cur.successes + 1, 0
            new_ok = True if cur.checks == 0 or succ >= self.rise else cur.ok
            nxt = replace(cur, successes=succ, failures=fail, latency=elapsed)
        else:
            succ, fail = 0, cur.failures + 1
            new_ok = False if cur.checks == 0 or fail >= self.fall else cur.ok
            nxt = replace(cur, successes=succ, failures=fail, last_error=error)
        flipped = cur.checks == 0 or new_ok != cur.ok
        nxt = replace(nxt, ok=new_ok, checks=cur.checks + 1, changed_at=self._clock() if flipped else cur.changed_at)
        self._status[name] = nxt
        if self.on_result is not None:
            await _call(self.on_result, name, error is None)
        if flipped and self.on_change is not None:
            await _call(self.on_change, name, new_ok)
        return nxt

    async def _loop(self, name: str) -> None:
        await asyncio.sleep(self._rng.uniform(0, self.interval))
        while name in self._status:
            started = time.monotonic()
            try:
                await self.check_once(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing callback must not stop checks
                cur = self._status.get(name)
                if cur is not None:
                    self._status[name] = replace(cur, last_error=f"checker error: {exc!r}")
            spacing = self.interval * (1 + self._rng.uniform(-self.jitter, self.jitter))
            await asyncio.sleep(max(0.0, spacing - (time.monotonic() - started)))

    def _spawn(self, name: str) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(self._loop(name), name=f"health:{name}")

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        for name in self._status:
            self._spawn(name)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> HealthChecker:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

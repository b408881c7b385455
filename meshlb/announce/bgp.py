"""Announcement by BGP: every mix a next hop of each VIP it forwards for.

The agent never speaks BGP. It announces a VIP by adding ``VIP/32 dev lo`` (``/128``)
to a kernel table of its own (``kernel_table.py``) and withdraws it by deleting the
route; a BGP speaker exports that table to the routers. The speaker is BIRD, a daemon
apart from the agent:

* ``managed``: the agent writes BIRD's configuration from ``[announce]``, starts BIRD
  detached, and a restarted agent adopts the running BIRD (by its PID file and control
  socket), reconfiguring it only if the configuration changed. So a ``kill -9`` of the
  agent and its restart withdraw nothing: forwarding carries on through the pinned
  data plane, the routes through the kernel table and the untouched speaker. A speaker
  that dies is restarted with backoff; its routes come back from the table.
* ``external``: the operator runs BIRD or FRR and exports the table; the agent only
  maintains the routes (and reads session states from a BIRD control socket if given).

A dead mix cannot withdraw: its neighbours' BFD (or hold timer) does.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

from meshlb.announce.bird import (
    BirdError,
    BirdProcess,
    parse_bfd_sessions,
    parse_protocols,
    protocol_name,
    render_config,
    session_status,
)
from meshlb.announce.interface import (
    EMPTY_VIEW,
    Announcer,
    ClusterView,
    ready_addresses,
)
from meshlb.announce.kernel_table import KernelVipTable
from meshlb.announce.settings import BgpSettings

log = logging.getLogger("meshlb.announce.bgp")

RESTART_BACKOFF_MAX_S = 30.0
HUNG_AFTER_S = 30.0  # a speaker whose control socket stays silent this long is replaced


class BgpAnnouncer(Announcer):
    mode = "bgp"

    def __init__(self, settings: BgpSettings, *, name: str, router_id: str = "", vips: Iterable[str] = ()) -> None:
        super().__init__(vips)
        self.settings = settings
        self.name = name
        self.router_id = settings.router_id or router_id
        self.table = KernelVipTable(settings.kernel_table, settings.route_protocol)
        run_dir = settings.run_dir or f"/run/meshlb/{name}/bird"
        managed = settings.speaker == "managed"
        self.bird: BirdProcess | None = BirdProcess(run_dir, settings.bird, settings.birdc) if managed else None
        if not managed and settings.control_socket:
            self._reader: BirdProcess | None = BirdProcess(run_dir, settings.bird, settings.birdc,
                                                           ctl=settings.control_socket)
        else:
            self._reader = self.bird
        self._wanted: frozenset[str] = frozenset()
        self._announced: frozenset[str] = frozenset()
        self._table_error = ""
        self._withdrawn = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._speaker_state = "not started" if managed else "external"
        self._speaker_error = ""
        self._speaker_pid: int | None = None
        self._next_start = 0.0
        self._backoff = 1.0
        self._sessions: dict[str, dict[str, Any]] = {}
        self.counters = {"announced": 0, "withdrawn": 0, "speaker_starts": 0, "speaker_adoptions": 0,
                         "speaker_reconfigurations": 0, "speaker_errors": 0, "table_errors": 0}

    # --- Announcer -----------------------------------------------------------------

    async def start(self) -> None:
        # the routes already in the table are this mix's announcements (a restarted
        # agent's predecessor made them); left alone until the first update
        try:
            self._announced = frozenset(await asyncio.to_thread(self.table.read))
            self._wanted = self._announced
        except Exception as exc:  # reported and retried by the first update
            self._table_failed(exc)
        if self.bird is not None:
            await self._ensure_speaker()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="announce-bgp")

    async def update(self, forwardable: AbstractSet[str], view: ClusterView = EMPTY_VIEW) -> None:
        self._wanted = frozenset() if self._withdrawn else ready_addresses(self.vips, forwardable)
        await self._sync()

    async def withdraw_all(self) -> None:
        self._withdrawn = True
        self._wanted = frozenset()
        await self._sync()

    async def stop(self, keep: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if keep:
            return
        await self.withdraw_all()
        if self.bird is not None:
            await self.bird.stop()
            self._speaker_state = "stopped"
            self._speaker_pid = None

    def status(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {
            "mode": self.mode,
            "speaker": s.speaker,
            "speaker_state": self._speaker_state,
            "speaker_pid": self._speaker_pid,
            "speaker_error": self._speaker_error,
            "kernel_table": s.kernel_table,
            "announced": sorted(self._announced),
            "wanted": sorted(self._wanted),
            "table_error": self._table_error,
            "withdrawn_all": self._withdrawn,
            "counters": dict(self.counters),
        }
        if self.bird is not None:
            out["neighbors"] = [
                {"address": n.address, "asn": n.asn,
                 **self._sessions.get(protocol_name(n), {"state": "unknown", "up": False, "last_error": ""})}
                for n in s.neighbors
            ]
        elif self._reader is not None:
            out["neighbors"] = list(self._sessions.values())
        else:
            out["neighbors"] = None  # unknown: an external speaker we cannot read
        return out

    # --- kernel table ----------------------------------------------------------------

    async def _sync(self) -> None:
        async with self._lock:
            wanted = self._wanted
            try:
                added, removed = await asyncio.to_thread(self.table.sync, wanted)
            except Exception as exc:
                self._table_failed(exc)
                return
            self._announced = wanted
            self._table_error = ""
            self.counters["announced"] += len(added)
            self.counters["withdrawn"] += len(removed)
            if added or removed:
                log.info("announce: %s%s", " ".join(f"+{a}" for a in added), " ".join(f"-{r}" for r in removed))

    def _table_failed(self, exc: Exception) -> None:
        self.counters["table_errors"] += 1
        msg = f"kernel table {self.settings.kernel_table}: {exc}"
        if msg != self._table_error:
            log.error("announce: %s (retrying)", msg)
        self._table_error = msg

    # --- the speaker -----------------------------------------------------------------

    def _config(self) -> str:
        return render_config(self.settings, self.router_id)

    async def _ensure_speaker(self) -> None:
        """Adopt the running BIRD (reconfigured if its configuration changed) or start one;
        on failure say why and schedule a retry with backoff."""
        assert self.bird is not None
        try:
            changed = self.bird.write_config(self._config())
            pid = self.bird.pid()
            if pid is not None and await self.bird.answers():
                if changed:
                    await self.bird.configure()
                    self.counters["speaker_reconfigurations"] += 1
                    log.info("announce: BIRD %d reconfigured (%s)", pid, self.bird.conf)
                elif self._speaker_pid != pid:
                    self.counters["speaker_adoptions"] += 1
                    log.info("announce: adopted the running BIRD %d (%s)", pid, self.bird.ctl)
            else:
                if pid is not None:  # alive but deaf past our patience: replace it
                    log.warning("announce: BIRD %d does not answer on %s; restarting it", pid, self.bird.ctl)
                    await self.bird.stop()
                pid = await self.bird.start()
                self.counters["speaker_starts"] += 1
                log.info("announce: started BIRD %d (%s)", pid, self.bird.conf)
            self._speaker_pid = pid
            self._speaker_state = "running"
            self._speaker_error = ""
            self._backoff = 1.0
        except (BirdError, ValueError, OSError) as exc:
            self.counters["speaker_errors"] += 1
            msg = str(exc)
            if msg != self._speaker_error:
                log.error("announce: BGP speaker: %s (retrying in %.0f s)", msg, self._backoff)
            self._speaker_error = msg
            self._speaker_state = "failed"
            self._next_start = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX_S)

    async def _supervise(self) -> None:
        deaf_since: float | None = None
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                if self._table_error:
                    await self._sync()
                if self.bird is not None:
                    pid = self.bird.pid()
                    if pid is None:
                        if self._speaker_state == "running":
                            self._speaker_state = "exited"
                            self._speaker_error = f"BIRD {self._speaker_pid} is gone"
                            log.error("announce: %s; restarting it", self._speaker_error)
                            self._next_start = 0.0
                        self._speaker_pid = None
                        self._sessions = {}
                        if time.monotonic() >= self._next_start:
                            await self._ensure_speaker()
                        continue
                if self._reader is None:
                    continue
                try:
                    await self._read_sessions()
                    deaf_since = None
                except BirdError as exc:
                    self._sessions = {}
                    if self.bird is not None:
                        self._speaker_error = str(exc)
                        now = time.monotonic()
                        deaf_since = deaf_since or now
                        if now - deaf_since >= HUNG_AFTER_S:  # alive but deaf: hung, replace it
                            deaf_since = None
                            self._speaker_pid = None
                            await self._ensure_speaker()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the supervisor die
                log.exception("announce: BGP supervisor")

    async def _read_sessions(self) -> None:
        assert self._reader is not None
        protocols = parse_protocols(await self._reader.command("show", "protocols", "all"))
        bfd: dict[str, str] = {}
        if any(p.proto == "BFD" for p in protocols.values()):
            bfd = parse_bfd_sessions(await self._reader.command("show", "bfd", "sessions"))
        self._sessions = {name: session_status(p, bfd) for name, p in protocols.items() if p.proto == "BGP"}
        if self.bird is not None and self._speaker_state == "running":
            self._speaker_error = ""


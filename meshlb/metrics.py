"""Prometheus exposition of the agent's state.

Values are pulled at scrape time from a snapshot function the agent provides, so
nothing is double-booked between the BPF counters and Python gauges. The HTTP
endpoint runs on the agent's event loop (not prometheus_client's thread server) so
a scrape reads agent state on the same thread that mutates it.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from meshlb.looplag import LoopLag

log = logging.getLogger("meshlb.metrics")


@dataclass(frozen=True)
class BackendRow:
    """One backend of one VIP as this node plans it."""

    vip: str
    backend: str  # member name or server "address:port"
    kind: str  # "member" or "external"
    state: str  # "active", "draining" or "down"
    healthy: bool
    weight: int  # the file's weight
    flows: int | None  # its conntrack entries here; None: not counted for this scrape


@dataclass
class Snapshot:
    """Everything a scrape shows; the agent fills it."""

    node: str = ""
    members_by_status: Mapping[str, int] = field(default_factory=dict)
    table_digest: str = ""
    table_changes: int = 0
    vip_traffic: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # vip -> (packets, bytes)
    backend_traffic: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    dataplane_reasons: Mapping[str, int] = field(default_factory=dict)  # reason -> packets
    conntrack_entries: int = 0
    conntrack_capacity: int = 0  # the map's max_entries; 0: not known
    evictions: Mapping[str, int] = field(default_factory=dict)  # sent/received/applied/...
    tracer_events: Mapping[str, int] = field(default_factory=dict)  # emitted/recovered/missed/...
    gossip_datagrams: Mapping[str, int] = field(default_factory=dict)  # sent/received
    gossip_drops: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    health: Mapping[str, bool] = field(default_factory=dict)  # target -> up
    health_checks: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (target, result) -> count
    loop_lag: LoopLag | None = None
    backends: Sequence[BackendRow] = ()


class AgentCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        s = self._snapshot()
        members = GaugeMetricFamily("meshlb_members", "Cluster members by status, as this node sees them", labels=["status"])
        for status in ("alive", "suspect", "dead", "left"):
            members.add_metric([status], s.members_by_status.get(status, 0))
        yield members

        info = InfoMetricFamily("meshlb_table", "Digest of this node's forwarding tables")
        info.add_metric([], {"digest": s.table_digest, "node": s.node})
        yield info
        yield CounterMetricFamily("meshlb_table_changes", "Forwarding-table swaps", value=s.table_changes)

        for scope, data in (("vip", s.vip_traffic), ("backend", s.backend_traffic)):
            pkts = CounterMetricFamily(f"meshlb_{scope}_packets", f"Packets balanced per {scope}", labels=[scope])
            byts = CounterMetricFamily(f"meshlb_{scope}_bytes", f"Bytes balanced per {scope}", labels=[scope])
            for key, (p, b) in sorted(data.items()):
                pkts.add_metric([key], p)
                byts.add_metric([key], b)
            yield pkts
            yield byts

        reasons = CounterMetricFamily("meshlb_dataplane_packets", "Packets by data-plane verdict reason", labels=["reason"])
        for reason, n in sorted(s.dataplane_reasons.items()):
            reasons.add_metric([reason], n)
        yield reasons

        yield GaugeMetricFamily("meshlb_conntrack_entries", "Entries in the conntrack map", value=s.conntrack_entries)
        yield GaugeMetricFamily("meshlb_conntrack_capacity",
                                "Entries the conntrack map holds before it forgets the least recently used "
                                "(0: not known)", value=s.conntrack_capacity)

        ev = CounterMetricFamily("meshlb_evictions", "Conntrack evictions by kind", labels=["kind"])
        for kind, n in sorted(s.evictions.items()):
            ev.add_metric([kind], n)
        yield ev

        tr = CounterMetricFamily("meshlb_tracer_events", "Socket-release tracer records and losses, by kind",
                                 labels=["kind"])
        for kind, n in sorted(s.tracer_events.items()):
            tr.add_metric([kind], n)
        yield tr

        dg = CounterMetricFamily("meshlb_gossip_datagrams", "Gossip datagrams", labels=["direction"])
        for direction, n in sorted(s.gossip_datagrams.items()):
            dg.add_metric([direction], n)
        yield dg
        drops = CounterMetricFamily("meshlb_gossip_dropped", "Gossip datagrams dropped, by reason", labels=["reason"])
        for reason, n in sorted(s.gossip_drops.items()):
            drops.add_metric([reason], n)
        yield drops

        up = GaugeMetricFamily("meshlb_health_up", "Health-check verdict per target (1 = usable)", labels=["target"])
        for target, ok in sorted(s.health.items()):
            up.add_metric([target], 1 if ok else 0)
        yield up
        checks = CounterMetricFamily("meshlb_health_checks", "Health checks run, by result", labels=["target", "result"])
        for (target, result), n in sorted(s.health_checks.items()):
            checks.add_metric([target, result], n)
        yield checks

        yield from _backend_families(s.backends)

        if s.loop_lag is not None:
            lag = HistogramMetricFamily(
                "meshlb_event_loop_lag_seconds",
                "How late the agent's event loop fired a timer due every 0.1 s (a busy loop answers probes late)")
            lag.add_metric([], s.loop_lag.cumulative(), s.loop_lag.total_s)
            yield lag


def _backend_families(rows: Sequence[BackendRow]) -> Iterable[Any]:
    state = GaugeMetricFamily("meshlb_backend_state", "Backends of each VIP by state (1 for the current one): "
                              "active, draining (no new flow) or down", labels=["vip", "backend", "kind", "state"])
    up = GaugeMetricFamily("meshlb_backend_up", "The cluster's agreed health of each VIP's backend (1 = healthy)",
                           labels=["vip", "backend"])
    weight = GaugeMetricFamily("meshlb_backend_weight", "Weight of each VIP's backend in the cluster file "
                               "(its share of new flows, unless it drains)", labels=["vip", "backend"])
    flows = GaugeMetricFamily("meshlb_backend_flows", "Conntrack entries of each VIP's backend on this node "
                              "(a draining backend's remaining flows)", labels=["vip", "backend"])
    for r in sorted(rows, key=lambda r: (r.vip, r.backend)):
        for st in ("active", "draining", "down"):
            state.add_metric([r.vip, r.backend, r.kind, st], 1 if r.state == st else 0)
        up.add_metric([r.vip, r.backend], 1 if r.healthy else 0)
        weight.add_metric([r.vip, r.backend], r.weight)
        if r.flows is not None:
            flows.add_metric([r.vip, r.backend], r.flows)
    yield from (state, up, weight, flows)


def render(snapshot: Callable[[], Snapshot]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(snapshot))
    return generate_latest(registry)


class MetricsServer:
    """A minimal HTTP/1.0 responder for GET /metrics on the event loop. ``snapshot`` may
    be a coroutine function."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot | Awaitable[Snapshot]]) -> None:
        self.host, self.port = host, port
        self._snapshot = snapshot
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.split()
            if len(parts) < 2 or parts[0] != b"GET":
                status, ctype, body = b"405 Method Not Allowed", b"text/plain", b"GET only\n"
            elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
                status, ctype, body = b"404 Not Found", b"text/plain", b"try /metrics\n"
            else:
                snap = self._snapshot()
                if inspect.isawaitable(snap):
                    snap = await snap  # it reads what must not hold the loop (conntrack)
                status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), render(lambda: snap)
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics scrape failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

"""What the agent serves to its operators: the control socket's operations (members,
stats, vips, conntrack count/list/flush, backend drain/undrain/list, leave, reload) and
the metrics endpoint's snapshot, read from the other parts. The JSON shapes are the ones
docs/operations.md documents."""
from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from typing import Any, Protocol

from meshlb import backends, control, metrics
from meshlb.agent.session import Session
from meshlb.agent.tables import TableSync
from meshlb.cluster.driver import GossipDriver
from meshlb.cluster.membership import MemberView
from meshlb.config import Config, HostPort
from meshlb.dataplane import layouts as L
from meshlb.health import HealthChecker
from meshlb.looplag import LoopLag

PROTO_NAMES = {L.IPPROTO_TCP: "tcp", L.IPPROTO_UDP: "udp"}
CONNTRACK_LIST_LIMIT = 1000


class Lifecycle(Protocol):
    """What operations read and trigger of the agent that owns the loop."""

    cfg: Config
    draining: bool
    started: float  # wall time

    def request_leave(self) -> None: ...

    async def reload(self) -> dict[str, Any]: ...


class Operations:
    def __init__(self, agent: Lifecycle, session: Session, tables: TableSync, driver: GossipDriver,
                 health: HealthChecker, *, evictions: Counter[str], health_checks: Counter[tuple[str, str]],
                 loop_lag: LoopLag) -> None:
        self.agent = agent
        self.session = session
        self.tables = tables
        self.driver = driver
        self.health = health
        self.evictions = evictions
        self.health_checks = health_checks
        self.loop_lag = loop_lag
        self.name = session.name
        self._control: control.ControlServer | None = None
        self._metrics: metrics.MetricsServer | None = None

    async def start(self, control_path: str, metrics_listen: HostPort | None) -> None:
        """Listen on the control socket and, unless ``metrics_listen`` is None, serve
        metrics over HTTP."""
        self._control = control.ControlServer(control_path, self.handlers())
        await self._control.start()
        if metrics_listen:
            self._metrics = metrics.MetricsServer(metrics_listen.host, metrics_listen.port, self.metrics_snapshot)
            await self._metrics.start()

    async def stop(self) -> None:
        if self._control is not None:
            await self._control.stop()
        if self._metrics is not None:
            await self._metrics.stop()

    def handlers(self) -> dict[str, control.Handler]:
        return {
            "members": self.members,
            "stats": self.stats,
            "vips": self.vips,
            "conntrack_count": self.conntrack_count,
            "conntrack_list": self.conntrack_list,
            "conntrack_flush": self.conntrack_flush,
            "backend_drain": lambda args: self.set_drain(args, True),
            "backend_undrain": lambda args: self.set_drain(args, False),
            "backends": self.backends,
            "leave": self.leave,
            "reload": lambda args: self.agent.reload(),
        }

    # ------------------------------------------------------------------ control socket

    async def members(self, args: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        members = sorted(self.driver.members(), key=lambda m: m.name)
        per_vip = await self._flows()
        flows = self._flows_by_name(per_vip)
        drained = self.driver.drained()
        # each backend's place in each VIP: (name) -> [{"vip", "weight", "health", "state", "flows"}]
        backend_of: dict[str, list[dict[str, Any]]] = {}
        for vip, rows in self._backend_rows(per_vip).items():
            for r in rows:
                backend_of.setdefault(r["name"], []).append(
                    {"vip": vip, "weight": r["weight"], "health": r["health"], "state": r["state"], "flows": r["flows"]})
        servers: dict[str, dict[str, Any]] = {}
        for bset in self.tables.sets.values():
            for b in bset.backends:
                if b.kind == backends.EXTERNAL:
                    entry = servers.setdefault(b.name, {
                        "name": b.name, "kind": b.kind, "address": b.address,
                        "port": int(b.name.rsplit(":", 1)[1]), "vips": [], "health": "ok" if b.healthy else "down",
                        "drained": backends.drain_key(b) in drained, "flows": flows.get(b.name, 0),
                        "backend_of": backend_of.get(b.name, [])})
                    entry["vips"].append(bset.vip_key)
        return {"node": self.name, "now": now,
                "members": [self._member_json(m, now, flows, drained) | {"backend_of": backend_of.get(m.name, [])}
                            for m in members],
                "servers": [servers[k] for k in sorted(servers)]}

    def _member_json(self, m: MemberView, now: float, flows: dict[str, int], drained: frozenset[str]) -> dict[str, Any]:
        me = m.name == self.name
        return {
            "name": m.name,
            "address": f"{m.address[0]}:{m.address[1]}",
            "status": m.status.value,
            "incarnation": m.incarnation,
            "vips": list(m.meta.vips),
            "health": "draining" if me and self.agent.draining else ("ok" if m.meta.app_healthy else "down"),
            "table_digest": m.meta.table_digest,
            # the node runs on the loop's monotonic clock; the CLI wants wall time
            "status_since": now - max(0.0, self.driver.now() - m.status_since),
            "self": me,
            # backs VIPs (false: a balancer only), drained cluster-wide, its flows here
            "kind": backends.MEMBER,
            "serves": bool(m.meta.vips),
            "drained": backends.member_drain_key(m.name) in drained or m.meta.weight == 0,
            "flows": flows.get(m.name, 0),
        }

    async def _flows(self) -> dict[tuple[int, int], int]:
        """Conntrack entries per (backend id, VIP id); read in a worker thread (a full
        map is a quarter million entries)."""
        return dict(await asyncio.to_thread(self.session.balancer.conntrack_flows))

    def _flows_by_name(self, flows: dict[tuple[int, int], int]) -> dict[str, int]:
        names = self.tables.backend_names()
        out: dict[str, int] = {}
        for (bid, _), n in flows.items():
            name = names.get(bid)
            if name is not None:
                out[name] = out.get(name, 0) + n
        return out

    def _backend_rows(self, flows: dict[tuple[int, int], int]) -> dict[str, list[dict[str, Any]]]:
        """Per VIP key, its backends as `vips` shows them."""
        out: dict[str, list[dict[str, Any]]] = {}
        for vip in self.tables.vips:
            bset = self.tables.sets.get(vip.key)
            vip_id = self.tables.vip_ids.get(vip.key)
            rows = []
            for b in bset.backends if bset else ():
                bid = self.tables.backend_ids.get((b.name, b.address, b.port))
                rows.append({"name": b.name, "kind": b.kind, "address": b.address, "port": b.port,
                             "weight": b.weight, "health": "ok" if b.healthy else "down", "state": b.state,
                             "flows": flows.get((bid, vip_id), 0) if bid is not None and vip_id is not None else 0})
            out[vip.key] = rows
        return out

    # ------------------------------------------------------------------ drain

    async def set_drain(self, args: dict[str, Any], drained: bool) -> dict[str, Any]:
        """Drain or undrain a backend cluster-wide: ``args["name"]`` is a member name or
        a server's address."""
        text = args.get("name")
        if not isinstance(text, str) or not text:
            raise control.ControlError("name a member or a server address")
        known = {e.key for e in self.driver.drain_entries()}
        try:
            key = backends.drain_target(text, self.agent.cfg.vips, [m.name for m in self.driver.members()], known)
        except backends.UnknownBackend as exc:
            raise control.ControlError(str(exc)) from None
        was = key in self.driver.drained()
        entry = self.driver.set_drain(key, drained, time.time_ns() // 1_000_000)
        return {"key": key, "drained": entry.drained, "was_drained": was, "stamp": entry.stamp,
                "origin": entry.origin}

    async def backends(self, args: dict[str, Any]) -> dict[str, Any]:
        """The cluster's drain map as this node holds it."""
        return {"node": self.name, "drains": [
            {"key": e.key, "drained": e.drained, "stamp": e.stamp, "origin": e.origin, "since": e.stamp / 1000}
            for e in self.driver.drain_entries()]}

    async def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        balancer = self.session.balancer
        return {
            "node": self.name,
            "uptime_s": round(time.time() - self.agent.started, 1),
            "xdp_mode": self.session.xdp_mode,
            "table_digest": self.tables.digest,
            "table_changes": self.tables.table_changes,
            "dataplane": balancer.counters(),
            "backends": {label: {"packets": p, "bytes": b} for label, (p, b) in self._backend_traffic().items()},
            "conntrack_entries": balancer.conntrack_count(),
            "evictions": dict(self.evictions),
            "tracer": self._tracer_stats(),
            "gossip": dict(self.driver.stats),
            "loop_lag": self.loop_lag.as_json(),
        }

    def _backend_traffic(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) per backend, labelled "member address[:port]" as in metrics
        (a server by its "address:port" alone)."""
        out = {}
        external = self.tables.external_ids
        for (name, addr, port), bid in self.tables.backend_ids.items():
            st = self.session.balancer.backend_stats(bid)
            out[backend_label(name, addr, port, bid in external)] = (st.packets, st.bytes)
        return out

    def _tracer_stats(self) -> dict[str, int]:
        t = self.session.tracer.stats()
        return {"emitted": t.emitted, "ringbuf_full": t.ringbuf_full, "queue_dropped": t.queue_dropped,
                "recovered": t.recovered, "missed": t.missed, "resets": t.resets,
                "resets_limited": t.resets_limited, "local_evicted": t.local_evicted,
                "sockops": t.sockops}

    async def vips(self, args: dict[str, Any]) -> dict[str, Any]:
        rows = self._backend_rows(await self._flows())
        out = []
        for vip in self.tables.vips:
            plan = self.tables.plans.get(vip.key)
            st = self.session.balancer.vip_stats(self.tables.vip_ids[vip.key])
            out.append({
                "vip": vip.key, "mode": vip.mode, "backends": list(plan.backends) if plan else [],
                "table_digest": plan.digest if plan else "", "packets": st.packets, "bytes": st.bytes,
                "backend_set": rows.get(vip.key, []),
            })
        return {"node": self.name, "vips": out}

    async def conntrack_count(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"entries": self.session.balancer.conntrack_count()}

    async def conntrack_list(self, args: dict[str, Any]) -> dict[str, Any]:
        limit = int(args.get("limit") or CONNTRACK_LIST_LIMIT)
        entries = self.session.balancer.conntrack_entries()
        now = time.monotonic_ns()
        names = {bid: key[0] for key, bid in self.tables.backend_ids.items()}
        out = []
        for k, v in entries[:limit]:
            src, dst = L.words_addr(k.src, k.family), L.words_addr(k.dst, k.family)
            out.append({
                "client": _hostport(src, L.port_host(k.sport)),
                "vip": _hostport(dst, L.port_host(k.dport)),
                "proto": PROTO_NAMES.get(k.proto, str(k.proto)),
                "backend": names.get(v.backend_id, str(v.backend_id)),
                "state": conntrack_state(k, v),
                "idle_s": max(0.0, (now - v.last_seen_ns) / 1e9),
            })
        return {"entries": out, "total": len(entries), "truncated": len(entries) > limit}

    async def conntrack_flush(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"deleted": self.session.balancer.conntrack_flush()}

    async def leave(self, args: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self.agent.request_leave)
        return {"drain_timeout_s": self.agent.cfg.drain.timeout_s}

    # ------------------------------------------------------------------ metrics

    async def metrics_snapshot(self) -> metrics.Snapshot:
        return self.snapshot(await self._flows())

    def snapshot(self, flows: dict[tuple[int, int], int] | None = None) -> metrics.Snapshot:
        balancer = self.session.balancer
        vip_traffic = {}
        for vip in self.tables.vips:
            st = balancer.vip_stats(self.tables.vip_ids[vip.key])
            vip_traffic[vip.key] = (st.packets, st.bytes)
        backend_traffic = self._backend_traffic()
        stats = self.driver.stats
        transport = stats.get("transport", {})
        drops = {k[len("drop."):]: v for k, v in stats.get("node", {}).items() if k.startswith("drop.")}
        for reason, n in transport.get("dropped", {}).items():
            drops[f"transport_{reason}"] = n
        return metrics.Snapshot(
            node=self.name,
            members_by_status=Counter(m.status.value for m in self.driver.members()),
            table_digest=self.tables.digest,
            table_changes=self.tables.table_changes,
            vip_traffic=vip_traffic,
            backend_traffic=backend_traffic,
            dataplane_reasons=balancer.counters(),
            conntrack_entries=balancer.conntrack_count(),
            conntrack_capacity=balancer.conntrack_capacity(),
            evictions=dict(self.evictions),
            tracer_events=self._tracer_stats(),
            gossip_datagrams={"sent": transport.get("datagrams_sent", 0),
                              "received": transport.get("datagrams_received", 0)},
            gossip_drops=drops,
            health={n: bool(r and r.ok) for n, r in self.health.results().items()},
            health_checks=dict(self.health_checks),
            loop_lag=self.loop_lag,
            backends=[metrics.BackendRow(vip, r["name"], r["kind"], r["state"], r["health"] == "ok", r["weight"],
                                         r["flows"] if flows is not None else None)
                      for vip, rows in self._backend_rows(flows or {}).items() for r in rows],
        )


def conntrack_state(k: L.FlowKey, v: L.CtValue) -> str:
    """As LVS names them: a TCP flow is SYN_RECV until its client acknowledges the
    handshake (what conntrack.handshake_timeout_s expires), then ESTABLISHED."""
    if k.proto != L.IPPROTO_TCP:
        return PROTO_NAMES.get(k.proto, str(k.proto)).upper()
    return "ESTABLISHED" if v.flags & L.MLB_CT_F_ESTABLISHED else "SYN_RECV"


def _hostport(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def backend_label(name: str, addr: str, port: int, external: bool) -> str:
    """How stats and metrics name a backend: "member address[:port]", a server by its
    "address:port"."""
    if external:
        return name
    label = f"[{addr}]" if ":" in addr else addr
    return f"{name} {label}:{port}" if port else f"{name} {label}"

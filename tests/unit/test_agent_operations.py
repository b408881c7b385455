"""What the control socket and the metrics endpoint serve (meshlb/agent/operations.py),
read from faked parts: the JSON shapes docs/operations.md documents."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from ipaddress import ip_address
from types import SimpleNamespace

from meshlb import control
from meshlb.agent.operations import Operations
from meshlb.backends import Backend, BackendSet
from meshlb.cluster.membership import MemberView
from meshlb.cluster.node import DrainEntry, MemberMeta, Status
from meshlb.config import VipConfig, default_config, parse
from meshlb.dataplane import layouts as L
from meshlb.dataplane.tracer import TracerStats
from meshlb.forwarding import VipPlan
from meshlb.looplag import LoopLag

VIP = VipConfig(address=ip_address("198.19.0.1"), port=80)
VIP6 = VipConfig(address=ip_address("fd00::1"), port=80, mode="nat", backend_port=8080)


class FakeBalancer:
    def __init__(self) -> None:
        k = L.flow_key("198.18.1.2", 40001, "198.19.0.1", 80, L.IPPROTO_TCP)
        k6 = L.flow_key("fd00::2", 40002, "fd00::1", 80, L.IPPROTO_UDP)
        now = time.monotonic_ns()
        self.entries = [(k, L.CtValue(backend_id=3, last_seen_ns=now)),
                        (k, L.CtValue(backend_id=9, flags=L.MLB_CT_F_ESTABLISHED, last_seen_ns=now)),
                        (k6, L.CtValue(backend_id=4, last_seen_ns=now))]

    def counters(self):
        return {"tx": 5}

    def conntrack_count(self):
        return len(self.entries)

    def conntrack_capacity(self):
        return 261760

    def conntrack_entries(self):
        return self.entries

    def conntrack_flush(self):
        return 3

    def conntrack_flows(self):
        return Counter((v.backend_id, 0 if k.family == 2 else 1) for k, v in self.entries)  # VIP, VIP6

    def vip_stats(self, vip_id):
        return L.LbStats(packets=10 + vip_id, bytes=1000)

    def backend_stats(self, bid):
        return L.LbStats(packets=bid, bytes=bid * 100)


class FakeDriver:
    running = True

    def __init__(self, members) -> None:
        self._members = members
        self.stats = {"transport": {"datagrams_sent": 7, "datagrams_received": 8, "dropped": {"oversize": 1}},
                      "node": {"drop.replay": 2, "probes": 9}}

    def members(self):
        return self._members

    def now(self) -> float:
        return 100.0

    drains: dict = {}

    def drained(self):
        return frozenset(k for k, e in self.drains.items() if e.drained)

    def drain_entries(self):
        return [self.drains[k] for k in sorted(self.drains)]

    def set_drain(self, key, drained, wall_ms):
        e = DrainEntry(key, drained, wall_ms, "mix1")
        self.drains = {**self.drains, key: e}
        return e


def member(name, status=Status.ALIVE, app_healthy=True):
    return MemberView(name, (f"10.0.0.{name[-1]}", 7946), status, 4,
                      MemberMeta(vips=(VIP.key,), app_healthy=app_healthy, table_digest="d"), 90.0)


def make_ops(draining=False):
    agent = SimpleNamespace(cfg=default_config(), draining=draining, started=time.time() - 5,
                            left=[], reloads=[])
    agent.request_leave = lambda: agent.left.append(True)

    async def reload():
        agent.reloads.append(True)
        return {"applied": [], "needs_restart": []}

    agent.reload = reload
    session = SimpleNamespace(name="mix1", xdp_mode="native", balancer=FakeBalancer(),
                              tracer=SimpleNamespace(stats=lambda: TracerStats(4, 0, 0, 0, sockops=2)))
    plan = VipPlan(VIP, ("198.18.0.231:80", "mix1", "mix2"), (0, 1, 0), "abc")
    bset = BackendSet.of(VIP.key, (
        Backend("198.18.0.231:80", "external", "198.18.0.231", 0, 2, True, "draining"),
        Backend("mix1", "member", "10.0.0.1", 0, 1, True, "active"),
        Backend("mix2", "member", "10.0.0.2", 0, 1, False, "down")))
    backend_ids = {("mix1", "10.0.0.1", 0): 3, ("mix2", "fd00::2", 8080): 4, ("198.18.0.231:80", "198.18.0.231", 0): 9}
    tables = SimpleNamespace(vips=(VIP, VIP6), vip_ids={VIP.key: 0, VIP6.key: 1}, plans={VIP.key: plan},
                             sets={VIP.key: bset}, backend_ids=backend_ids, external_ids={9},
                             backend_names=lambda: {b: k[0] for k, b in backend_ids.items()},
                             digest="f00d", table_changes=2)
    driver = FakeDriver([member("mix2", Status.SUSPECT, app_healthy=False), member("mix1")])
    health = SimpleNamespace(results=lambda: {"mix1": SimpleNamespace(ok=True), "mix2": None})
    return Operations(agent, session, tables, driver, health, evictions=Counter(sent=3),
                      health_checks=Counter({("mix1", "ok"): 6}), loop_lag=LoopLag()), agent


def call(ops, op, args=None):
    return asyncio.run(ops.handlers()[op](args or {}))


def test_members_names_each_member_as_the_cli_shows_it():
    ops, _ = make_ops(draining=True)
    out = call(ops, "members")
    assert out["node"] == "mix1" and [m["name"] for m in out["members"]] == ["mix1", "mix2"]
    me, other = out["members"]
    assert me == {"name": "mix1", "address": "10.0.0.1:7946", "status": "alive", "incarnation": 4,
                  "vips": [VIP.key], "health": "draining", "table_digest": "d",
                  "status_since": me["status_since"], "self": True, "kind": "member", "serves": True,
                  "drained": False, "flows": 1,
                  "backend_of": [{"vip": VIP.key, "weight": 1, "health": "ok", "state": "active", "flows": 1}]}
    assert other["backend_of"] == [{"vip": VIP.key, "weight": 1, "health": "down", "state": "down", "flows": 0}]
    # a server: its endpoint, the VIPs it backs, the cluster's verdict, its flows here
    assert out["servers"] == [{"name": "198.18.0.231:80", "kind": "external", "address": "198.18.0.231", "port": 80,
                               "vips": [VIP.key], "health": "ok", "drained": False, "flows": 1,
                               "backend_of": [{"vip": VIP.key, "weight": 2, "health": "ok", "state": "draining",
                                               "flows": 1}]}]
    # the node's clock is the loop's: 10 s before its now is 10 s before the wall clock
    assert abs(out["now"] - 10 - me["status_since"]) < 1e-6
    assert (other["status"], other["health"], other["self"]) == ("suspect", "down", False)


def test_stats_and_vips():
    ops, _ = make_ops()
    st = call(ops, "stats")
    assert set(st) == {"node", "uptime_s", "xdp_mode", "table_digest", "table_changes", "dataplane",
                       "backends", "conntrack_entries", "evictions", "tracer", "gossip", "loop_lag"}
    # labelled as the metrics label them: member, address, the nat backend port
    assert st["backends"] == {"mix1 10.0.0.1": {"packets": 3, "bytes": 300},
                              "mix2 [fd00::2]:8080": {"packets": 4, "bytes": 400},
                              "198.18.0.231:80": {"packets": 9, "bytes": 900}}
    assert (st["xdp_mode"], st["table_digest"], st["table_changes"]) == ("native", "f00d", 2)
    assert st["evictions"] == {"sent": 3}
    assert 4.5 < st["uptime_s"] < 30 and st["tracer"]["sockops"] == 2 and st["tracer"]["emitted"] == 4
    vips = call(ops, "vips")["vips"]
    assert vips[0] == {"vip": VIP.key, "mode": "dr", "backends": ["198.18.0.231:80", "mix1", "mix2"],
                       "table_digest": "abc", "packets": 10, "bytes": 1000, "backend_set": [
                           {"name": "198.18.0.231:80", "kind": "external", "address": "198.18.0.231", "port": 0,
                            "weight": 2, "health": "ok", "state": "draining", "flows": 1},
                           {"name": "mix1", "kind": "member", "address": "10.0.0.1", "port": 0, "weight": 1,
                            "health": "ok", "state": "active", "flows": 1},
                           {"name": "mix2", "kind": "member", "address": "10.0.0.2", "port": 0, "weight": 1,
                            "health": "down", "state": "down", "flows": 0}]}
    assert vips[1]["vip"] == "[fd00::1]:80/tcp" and vips[1]["backends"] == [] and vips[1]["packets"] == 11


def test_conntrack_operations():
    ops, _ = make_ops()
    assert call(ops, "conntrack_count") == {"entries": 3}
    assert call(ops, "conntrack_flush") == {"deleted": 3}
    out = call(ops, "conntrack_list", {"limit": 2})
    assert out["total"] == 3 and out["truncated"] is True and len(out["entries"]) == 2
    first, second = out["entries"]
    assert first["client"] == "198.18.1.2:40001" and first["vip"] == "198.19.0.1:80" and first["proto"] == "tcp"
    assert (first["backend"], first["state"]) == ("mix1", "SYN_RECV")
    assert (second["backend"], second["state"]) == ("198.18.0.231:80", "ESTABLISHED")
    udp = call(ops, "conntrack_list")["entries"][2]
    assert udp == {"client": "[fd00::2]:40002", "vip": "[fd00::1]:80", "proto": "udp", "backend": "mix2",
                   "state": "UDP", "idle_s": udp["idle_s"]}
    assert 0 <= udp["idle_s"] < 5


def test_leave_and_reload_go_to_the_agent():
    async def main():
        ops, agent = make_ops()
        out = await ops.handlers()["leave"]({})
        assert out == {"drain_timeout_s": agent.cfg.drain.timeout_s} and agent.left == []
        await asyncio.sleep(0)  # the reply goes out before the leave starts
        assert agent.left == [True]
        assert await ops.handlers()["reload"]({}) == {"applied": [], "needs_restart": []} and agent.reloads

    asyncio.run(main())


def test_snapshot_for_metrics():
    ops, _ = make_ops()
    s = ops.snapshot()
    assert s.node == "mix1" and s.members_by_status == {"alive": 1, "suspect": 1}
    assert s.vip_traffic == {VIP.key: (10, 1000), VIP6.key: (11, 1000)}
    assert s.backend_traffic == {"mix1 10.0.0.1": (3, 300), "mix2 [fd00::2]:8080": (4, 400),
                                 "198.18.0.231:80": (9, 900)}
    assert s.gossip_datagrams == {"sent": 7, "received": 8}
    assert s.gossip_drops == {"replay": 2, "transport_oversize": 1}
    assert s.health == {"mix1": True, "mix2": False} and s.health_checks == {("mix1", "ok"): 6}
    assert s.conntrack_capacity == 261760  # the fill alert divides by it
    assert s.conntrack_entries == 3 and s.evictions == {"sent": 3} and s.tracer_events["sockops"] == 2

    assert [(r.backend, r.state, r.flows) for r in s.backends] == [
        ("198.18.0.231:80", "draining", None), ("mix1", "active", None), ("mix2", "down", None)]
    s = asyncio.run(ops.metrics_snapshot())
    assert [(r.vip, r.backend, r.kind, r.healthy, r.weight, r.flows) for r in s.backends] == [
        (VIP.key, "198.18.0.231:80", "external", True, 2, 1), (VIP.key, "mix1", "member", True, 1, 1),
        (VIP.key, "mix2", "member", False, 1, 0)]


def test_drain_and_undrain_name_members_and_server_addresses():
    ops, agent = make_ops()
    agent.cfg = parse('[node]\nname = "mix1"\n[cluster]\nkey_file = "/k"\n[[vips]]\naddress = "198.19.0.1"\n'
                      'port = 80\nservers = ["198.18.0.231"]\n')
    out = call(ops, "backend_drain", {"name": "mix2"})
    assert (out["key"], out["drained"], out["was_drained"], out["origin"]) == ("member:mix2", True, False, "mix1")
    assert abs(out["stamp"] / 1000 - time.time()) < 5
    assert call(ops, "backend_drain", {"name": "198.18.0.231"})["key"] == "server:198.18.0.231"
    assert call(ops, "members")["members"][1]["drained"] is True
    assert [e["key"] for e in call(ops, "backends")["drains"]] == ["member:mix2", "server:198.18.0.231"]
    out = call(ops, "backend_undrain", {"name": "mix2"})
    assert (out["drained"], out["was_drained"]) == (False, True)
    for bad, msg in (("mix9", "no member or server named 'mix9' in this cluster (members: mix1, mix2; "
                               "servers: 198.18.0.231)"),
                     ("", "name a member or a server address")):
        server = control.ControlServer("/nonexistent", ops.handlers())
        reply = asyncio.run(server._dispatch(json.dumps({"op": "backend_drain", "args": {"name": bad}}).encode()))
        assert reply == {"ok": False, "error": msg}

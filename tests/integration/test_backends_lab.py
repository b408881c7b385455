"""Backends beyond the mixes, on the netns lab with real traffic: real servers (srvN,
the demo app and no meshlb) reached in dr and nat, a VIP served by a list of members,
weights, a drain under load (wrk) that holds new flows off the drained backend from the
moment every mix has seen it while its established flows finish, the drain outliving
the mix it was issued on and agent restarts, and the errors.

One lab for the module: three mixes that serve, two real servers, and two VIPs of
their own (weights 1:2:3 over mix1, srv1, srv2; nat served by mix2 alone).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlb.lab.lab import VIP_DR, VIP_DR6, VIP_NAT, server_addr4
from tests.integration.lab_helpers import call, client_run, curl_many, digests, mixes, parse_wrk, running_lab, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

W_VIP = "198.19.0.5"  # dr, weights 1:2:3 over mix1, srv1, srv2
ONE_VIP = "198.19.0.6"  # nat, members = ["mix2"], no server
SRV1, SRV2 = server_addr4(1), server_addr4(2)
CLOSING_S = 2.0
DEFAULT_VIPS = [
    {"address": VIP_DR, "port": 80, "protocol": "tcp", "mode": "dr"},
    {"address": VIP_NAT, "port": 80, "protocol": "tcp", "mode": "nat"},
    {"address": VIP_DR6, "port": 80, "protocol": "tcp", "mode": "dr"},
]


@pytest.fixture(scope="module")
def lab():
    vips = DEFAULT_VIPS + [
        {"address": W_VIP, "port": 80, "mode": "dr", "members": ["mix1"],
         "weights": {"mix1": 1, SRV1: 2, SRV2: 3}},
        {"address": ONE_VIP, "port": 80, "mode": "nat", "members": ["mix2"], "servers": []},
    ]
    with running_lab("b", nodes=3, servers=2, vips=vips, idle_timeout_s=0, health_interval_s=0.5,
                     closing_timeout_s=CLOSING_S) as lab:
        yield lab


def vip_row(lab, node, vip):
    host = f"[{vip}]" if ":" in vip and not vip.startswith("[") else vip
    return next(v for v in call(lab, node, "vips")["vips"] if v["vip"].startswith(f"{host}:"))


def backend_row(lab, node, vip, name):
    return next((b for b in vip_row(lab, node, vip)["backend_set"] if b["name"] == name), None)


@pytest.mark.parametrize("vip", [VIP_DR, VIP_NAT, f"[{VIP_DR6}]"])
def test_real_servers_answer_with_the_mixes(lab, vip):
    answers = curl_many(lab, vip, 40)
    assert answers.get("FAIL", 0) == 0, answers
    assert set(answers) == {"mix1", "mix2", "mix3", "srv1", "srv2"}, answers
    for b in vip_row(lab, "mix1", vip)["backend_set"]:
        want = "external" if b["name"][0] in "1[" else "member"
        assert (b["kind"], b["health"], b["state"], b["weight"]) == (want, "ok", "active", 1), b


def test_a_vip_served_by_a_list_of_members(lab):
    for m in mixes(lab):
        assert vip_row(lab, m, ONE_VIP)["backends"] == ["mix2"]
    answers = curl_many(lab, ONE_VIP, 20)
    assert answers == {"mix2": 20}, answers
    # mix2 serves it, the others forward to it: every mix balances the VIP
    assert all(vip_row(lab, m, ONE_VIP)["packets"] > 0 for m in mixes(lab))


def test_weights_share_new_connections(lab):
    """1:2:3 over a member and two servers: each one's share of 3000 new connections
    within 3 points of its weight's (the bench runs 30,000 for the 2-point goal)."""
    rows = {b["name"]: b["weight"] for b in vip_row(lab, "mix2", W_VIP)["backend_set"]}
    assert rows == {"mix1": 1, f"{SRV1}:80": 2, f"{SRV2}:80": 3}
    res = client_run(lab, [sys.executable, "-m", "meshlb.lab.tally", f"http://{W_VIP}/", "-n", "3000", "-c", "30"],
                     timeout=120)
    out = json.loads(res.stdout)
    assert out["failed"] == 0, out
    total = sum(out["answers"].values())
    for name, weight in (("mix1", 1), ("srv1", 2), ("srv2", 3)):
        assert abs(out["answers"][name] / total - weight / 6) < 0.03, out


def _syn_counter(lab, node):
    """An nftables counter of the SYNs of balanced flows reaching ``node``: from the
    client's network (dr, and what a mix passes to itself) or from a mix's SNAT ports
    (nat); health checks come from ports above those."""
    ns = lab.namespace(node)
    rules = lab.sdir / f"syns-{node}.nft"
    rules.write_text("table inet mlbdrain\ndelete table inet mlbdrain\ntable inet mlbdrain {\n chain in {\n"
                     "  type filter hook input priority 0;\n"
                     "  tcp dport 80 tcp flags & (syn | ack) == syn ip saddr 198.18.1.0/24 counter\n"
                     "  tcp dport 80 tcp flags & (syn | ack) == syn tcp sport 10000-32767 counter\n }\n}\n")
    ns.check_output(["nft", "-f", str(rules)])

    def read() -> int:
        out = json.loads(ns.check_output(["nft", "-j", "list", "chain", "inet", "mlbdrain", "in"]))
        return sum(e["rule"]["expr"][-1]["counter"]["packets"] for e in out["nftables"] if "rule" in e)
    return read


def _flows(lab, vip, name):
    return {m: (backend_row(lab, m, vip, name) or {}).get("flows", 0) for m in mixes(lab)}


@pytest.mark.parametrize("target, name, vip", [("mix3", "mix3", VIP_NAT), (SRV1, f"{SRV1}:80", VIP_DR)],
                         ids=["member-nat", "server-dr"])
def test_drain_under_load(lab, target, name, vip):
    """wrk through the VIP, keep-alive connections and one connection per request at
    once. The drain stops new flows to the backend from the moment every mix shows it
    draining, the keep-alive connections it holds carry on to the end, no request
    fails, and its conntrack entries go once its connections end."""
    node = "mix3" if target == "mix3" else "srv1"
    syns = _syn_counter(lab, node)
    client = lab.namespace("client")
    argv = ["wrk", "-t1", "-d7s", "--timeout", "5s"]
    # 40 connections: each lands on the drained backend with p = 1/5, none with p < 1e-3
    keep = client.popen([*argv, "-c40", f"http://{vip}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    close = client.popen([*argv, "-c8", "-H", "Connection: close", f"http://{vip}/"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)
        assert syns() > 0  # it took new flows before
        res = call(lab, "mix1", "backend_drain", name=target)
        assert res["drained"] and not res["was_drained"]
        took = wait_for(lambda: all(backend_row(lab, m, vip, name)["state"] == "draining" for m in mixes(lab)),
                        5, 0.01, what="every mix shows the drain")
        seen = syns()
        print(f"drain of {target}: every mix saw it {took * 1000:.0f} ms after the command")
        held = _flows(lab, vip, name)
        outs = [p.communicate(timeout=30)[0] for p in (keep, close)]
    finally:
        for p in (keep, close):
            if p.poll() is None:
                p.kill()
                p.wait()
    after = syns()
    assert after == seen, f"{after - seen} new flows reached {target} after every mix saw the drain"
    for out in outs:
        r = parse_wrk(out)
        assert r["requests"] > 100 and (r["connect"], r["read"], r["write"], r["timeout"], r["non2xx"]) == (0,) * 5, out
    # its keep-alive connections were still there when the drain landed, and ran to the end
    assert sum(held.values()) > 0, held
    took = wait_for(lambda: sum(_flows(lab, vip, name).values()) == 0, CLOSING_S + 5, 0.1,
                    what=f"{target}'s conntrack entries gone")
    print(f"{target}: conntrack entries gone {took:.2f} s after the load ended")
    call(lab, "mix2", "backend_undrain", name=target)
    wait_for(lambda: all(backend_row(lab, m, vip, name)["state"] == "active" for m in mixes(lab)), 5,
             what="undrained everywhere")
    assert len(digests(lab, mixes(lab))) == 1


def test_a_drain_outlives_its_mix_and_every_agent_restart(lab):
    name = f"{SRV2}:80"

    def drained_everywhere(nodes):
        return all(backend_row(lab, m, VIP_DR, name)["state"] == "draining" for m in nodes)

    call(lab, "mix3", "backend_drain", name=SRV2)
    wait_for(lambda: drained_everywhere(mixes(lab)), 5, what="drained everywhere")
    # the mix it was issued on dies: the others keep it; back, it has it too
    os.kill(lab.state["nodes"]["mix3"]["agent_pid"], signal.SIGKILL)
    time.sleep(1)
    assert drained_everywhere(["mix1", "mix2"])
    lab.restart_agent("mix3")
    lab.wait_converged(60)
    assert drained_everywhere(mixes(lab))
    # every agent at once: nobody is left to tell the others, the state files do
    for m in mixes(lab):
        os.kill(lab.state["nodes"][m]["agent_pid"], signal.SIGKILL)
    for m in mixes(lab):
        lab.restart_agent(m)
    lab.wait_converged(60)
    assert drained_everywhere(mixes(lab)) and len(digests(lab, mixes(lab))) == 1
    assert curl_many(lab, VIP_DR, 30).get("srv2", 0) == 0
    call(lab, "mix1", "backend_undrain", name=SRV2)
    wait_for(lambda: all(backend_row(lab, m, VIP_DR, name)["state"] == "active" for m in mixes(lab)), 5,
             what="undrained everywhere")


def test_bad_input_is_one_line_and_a_bad_reload_changes_nothing(lab):
    res = lab.namespace("mix1").popen(
        [sys.executable, "-m", "meshlb", "backend", "drain", "nosuch",
         "--control", lab.state["nodes"]["mix1"]["control"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = res.communicate(timeout=30)
    assert res.returncode == 1 and out == "", (out, err)
    assert re.fullmatch(r"meshlb backend drain: no member or server named 'nosuch' in this cluster "
                        r"\(members: mix1, mix2, mix3; servers: 198\.18\.0\.231, 198\.18\.0\.232, fd00:[^)]*\)\n", err), err
    path = Path(lab.state["nodes"]["mix1"]["config"])
    good = path.read_text()
    before = (digests(lab, ["mix1"]), vip_row(lab, "mix1", VIP_DR)["backend_set"])
    bad = good.replace(f'servers = ["{SRV1}", "{SRV2}"]', f'servers = ["{SRV1}", "{SRV1}:80"]', 1)
    assert bad != good
    try:
        path.write_text(bad)
        res = call(lab, "mix1", "reload")
        assert res["error"] == f"{path}: vips[0].servers[1]: {SRV1}:80 is listed twice (also vips[0].servers[0])"
        assert (digests(lab, ["mix1"]), vip_row(lab, "mix1", VIP_DR)["backend_set"]) == before
    finally:
        path.write_text(good)

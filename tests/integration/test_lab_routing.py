"""`meshlb lab up --routing bgp|l2`: the lab's network side is real routing software or
a real segment, and traffic reaches the mixes only through what they announce. The
mixes' agents do not announce yet, so each mix's announcer runs beside its agent
(tests/announce/driver.py, in the mix's namespace)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from meshlb.lab import bgp_router
from meshlb.lab.lab import VIP_DR, VIP_DR6, VIP_NAT, mix_addr4, mix_addr6
from tests.announce.helpers import need_program
from tests.announce.netns_helpers import Driver, gossip
from tests.integration.lab_helpers import curl_many, mixes, running_lab, wait_for

privileged, slow = pytest.mark.privileged, pytest.mark.slow


def lab_status(lab) -> dict:
    res = subprocess.run([sys.executable, "-m", "meshlb", "lab", "status", "--format", "json", "--prefix",
                          lab.opts.prefix], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def vip_keys(lab) -> list[str]:
    return [f"[{v['address']}]:{v['port']}/{v['protocol']}" if ":" in v["address"]
            else f"{v['address']}:{v['port']}/{v['protocol']}" for v in lab.state["vips"]]


@privileged
@slow
def test_bgp_lab_routes_to_the_mixes_that_announce():
    need_program("bird")
    drivers: dict[str, Driver] = {}
    with running_lab("g", nodes=3, routing="bgp", health_interval_s=0.5) as lab:
        try:
            st = lab_status(lab)
            assert st["routing"] == "bgp" and st["bgp"]["mix_asn"] == bgp_router.MIX_ASN
            (router_bird,) = st["daemons"]
            assert router_bird["running"]
            # no static route: nothing is routed to the mixes before they announce
            assert st["next_hops"] == {VIP_DR: [], VIP_NAT: [], VIP_DR6: []}, st["next_hops"]
            assert curl_many(lab, VIP_DR, 1) == {"FAIL": 1}
            bgp = lab.state["bgp"]
            for m in mixes(lab):
                i = int(m[3:])
                spec = {"mode": "bgp", "name": m, "router_id": mix_addr4(i), "vips": vip_keys(lab), "bgp": {
                    "local_asn": bgp["mix_asn"],
                    "neighbors": [{"address": a, "asn": bgp["router_asn"]} for a in bgp["router_addresses"]],
                    # where the lab will have the agents' speakers: `lab down` finds them there
                    "run_dir": str(lab.sdir / f"{m}-bird"), "poll_interval": 0.5}}
                drivers[m] = Driver(lab.namespace(m), spec, lab.sdir / f"{m}.announce.log")
                drivers[m].call("start")
                drivers[m].call("update", forwardable=vip_keys(lab))
            every = {VIP_DR: [mix_addr4(i) for i in (1, 2, 3)], VIP_NAT: [mix_addr4(i) for i in (1, 2, 3)],
                     VIP_DR6: [mix_addr6(i) for i in (1, 2, 3)]}
            took = wait_for(lambda: lab_status(lab)["next_hops"] == every, 30, 0.2, what="every mix a next hop")
            print(f"bgp lab: the router's ECMP route over three mixes {took:.2f} s after they announced")
            for vip in (VIP_DR, VIP_NAT, f"[{VIP_DR6}]"):
                answers = curl_many(lab, vip, 30)
                assert answers.get("FAIL", 0) == 0 and set(answers) == set(mixes(lab)), (vip, answers)
            # mix3's speaker dies: the router withdraws it by itself, traffic carries on
            os.kill(drivers["mix3"].status()["speaker_pid"], signal.SIGKILL)
            drivers["mix3"].kill()  # and its announcer, so nothing restarts the speaker
            wait_for(lambda: mix_addr4(3) not in lab.next_hops()[VIP_DR], 5, 0.01, what="mix3 withdrawn")
            answers = curl_many(lab, VIP_DR, 30)
            assert answers.get("FAIL", 0) == 0 and set(answers) == set(mixes(lab)), answers  # mix3 still a backend
            # an agent killed with its speaker running: `lab down` must stop that speaker
            left = drivers["mix1"].status()["speaker_pid"]
            drivers["mix1"].kill()
        finally:
            for d in drivers.values():
                with contextlib.suppress(Exception):
                    d.close(keep=False)
    # running_lab's `lab down` removed the router's BIRD and the speaker left behind
    time.sleep(0.1)
    assert not bgp_router.daemon_running(router_bird["pid"], router_bird["marker"])
    assert not bgp_router.daemon_running(left, "bird")


@privileged
@slow
def test_l2_lab_the_owner_answers_for_each_vip_and_balances():
    drivers: dict[str, Driver] = {}
    with running_lab("2", nodes=3, routing="l2", health_interval_s=0.5) as lab:
        try:
            st = lab_status(lab)
            assert st["routing"] == "l2" and "router" not in st["nodes"] and "next_hops" not in st
            for m in mixes(lab):
                spec = {"mode": "l2", "name": m, "iface": "eth0", "vips": vip_keys(lab)}
                drivers[m] = Driver(lab.namespace(m), spec, lab.sdir / f"{m}.announce.log")
                drivers[m].call("start")
            history = gossip(drivers, {m: vip_keys(lab) for m in mixes(lab)})
            owned = {m: history[-1][m]["owned"] for m in mixes(lab)}
            assert sorted(v for vs in owned.values() for v in vs) == sorted([VIP_DR, VIP_NAT, VIP_DR6]), owned
            for vip in (VIP_DR, VIP_NAT, f"[{VIP_DR6}]"):
                answers = curl_many(lab, vip, 30)
                # one owner takes the VIP's packets, its XDP balances them over every mix
                assert answers.get("FAIL", 0) == 0 and set(answers) == set(mixes(lab)), (vip, answers)
        finally:
            for d in drivers.values():
                with contextlib.suppress(Exception):
                    d.close(keep=False)


@pytest.mark.parametrize("routing", ["ospf", ""])
def test_unknown_routing_is_refused_before_anything_is_built(routing):
    from meshlb.lab.lab import Lab, LabError, LabOptions

    with pytest.raises(LabError, match="--routing must be one of static, bgp, l2"):
        Lab(LabOptions(prefix=f"mlr{os.getpid()}", routing=routing)).up()

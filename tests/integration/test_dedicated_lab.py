"""The dedicated mode on the netns lab (`meshlb lab up --serve none --servers 3`): two
mixes that balance only (node.serve = false, no application), three real servers that
run the demo app and no meshlb; the seed's own test, `ab -c 500 -n 8000` through the
VIP, in nat and in dr (the servers hold the VIP on their loopback, LVS-DR style)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.integration.lab_helpers import VIPS, ab, call, client_run, mixes, running_lab

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

SERVERS = {"srv1", "srv2", "srv3"}


@pytest.fixture(scope="module")
def lab():
    with running_lab("d", nodes=2, servers=3, serve="none", idle_timeout_s=0, health_interval_s=0.5,
                     closing_timeout_s=2.0) as lab:
        yield lab


def test_balancers_serve_nothing_and_list_the_servers(lab):
    for m in mixes(lab):
        out = call(lab, m, "members")
        assert [(x["name"], x["serves"], x["vips"]) for x in out["members"]] == [("mix1", False, []),
                                                                                 ("mix2", False, [])]
        assert {s["name"] for s in out["servers"]} >= {f"198.18.0.{231 + i}:80" for i in range(3)}
        for v in call(lab, m, "vips")["vips"]:
            assert {b["kind"] for b in v["backend_set"]} == {"external"} and len(v["backends"]) == 3, v
    status = lab.state["nodes"]
    assert all("app_pid" not in status[m] for m in mixes(lab))  # a balancer runs no application
    assert all(status[s]["role"] == "server" and "agent_pid" not in status[s] for s in SERVERS)


@pytest.mark.parametrize("mode", ["nat", "dr"])
def test_ab_through_a_balancer_only_node_to_three_real_servers(lab, mode):
    result = ab(lab, f"http://{VIPS[mode]}/", concurrency=500, requests=8000)
    assert (result["complete"], result["failed"], result["non2xx"]) == (8000, 0, 0), result
    res = client_run(lab, [sys.executable, "-m", "meshlb.lab.tally", f"http://{VIPS[mode]}/", "-n", "300"])
    out = json.loads(res.stdout)
    assert out["failed"] == 0 and set(out["answers"]) == SERVERS, out

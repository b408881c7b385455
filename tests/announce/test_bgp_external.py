"""External speaker mode: the operator runs the BGP daemon and exports the agent's kernel
table; the announcer only maintains the routes. Checked with both daemons the docs give
a configuration for: BIRD (the generated configuration, run by "the operator") and FRR
(zebra's import-table, redistributed into BGP), against the lab router's BIRD."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from meshlb.announce.bird import render_config
from meshlb.announce.settings import BgpSettings, Neighbor
from meshlb.lab.bgp_router import (
    MIX_ASN,
    ROUTER_ASN,
    RouterBird,
    daemon_pids_under,
    next_hops,
    router_config,
    stop_daemon,
)
from meshlb.lab.netns import Topology
from tests.announce.helpers import need_program
from tests.announce.netns_helpers import Driver, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

ROUTER4, ROUTER6 = "10.87.0.1", "fd87::1"
VIP4, VIP6 = "198.19.87.1", "fd00:87:63::1"
VIPS = [f"{VIP4}:80/tcp", f"[{VIP6}]:80/tcp"]
MIX1, MIX1_6, MIX2 = "10.87.0.11", "fd87::b", "10.87.0.12"

# What docs/architecture.md gives for FRR (tested here with FRR 8.4, IPv4)
FRR_CONF = f"""\
frr defaults datacenter
ip import-table 100
!
ip prefix-list meshlb-vips seq 5 permit 0.0.0.0/0 ge 32
route-map meshlb-vips permit 10
 match ip address prefix-list meshlb-vips
!
router bgp {MIX_ASN}
 bgp router-id {MIX2}
 neighbor {ROUTER4} remote-as {ROUTER_ASN}
 neighbor {ROUTER4} bfd
 address-family ipv4 unicast
  redistribute table 100 route-map meshlb-vips
 exit-address-family
"""


@pytest.fixture(scope="module")
def net():
    need_program("bird")
    topo = Topology(f"mlbx{os.getpid()}")
    run = Path(f"/tmp/mlbx{os.getpid()}")
    run.mkdir(mode=0o700)
    frr_pids: list[int] = []
    try:
        topo.add_bridge("br")
        router = topo.add_namespace("router")
        topo.connect(router, "br", addresses=[f"{ROUTER4}/24", f"{ROUTER6}/64"])
        topo.connect(topo.add_namespace("mix1"), "br", addresses=[f"{MIX1}/24", f"{MIX1_6}/64"])
        topo.connect(topo.add_namespace("mix2"), "br", addresses=[f"{MIX2}/24"])
        RouterBird(run).start(router, router_config(ROUTER4, [("mix1", [MIX1, MIX1_6]), ("mix2", [MIX2])]))
        yield topo, run, frr_pids
    finally:
        for pid in frr_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid, marker in daemon_pids_under(run):
            stop_daemon(pid, marker)
        for pid in frr_pids:
            stop_daemon(pid, "frr", timeout=3)
        leftovers = topo.teardown()
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(f"/var/run/frr/mlbx{os.getpid()}", ignore_errors=True)
        assert leftovers == []


def hops(topo):
    return next_hops(topo["router"], [VIP4, VIP6])


def test_external_bird_exports_the_table_and_its_sessions_are_read(net):
    topo, run, _ = net
    mix = topo["mix1"]
    # the operator's BIRD, with the configuration the docs point at
    settings = BgpSettings(local_asn=MIX_ASN, neighbors=(Neighbor(ROUTER4, ROUTER_ASN), Neighbor(ROUTER6, ROUTER_ASN)),
                           log=str(run / "operator-bird.log"))
    d = run / "operator"
    d.mkdir()
    (d / "bird.conf").write_text(render_config(settings, MIX1))
    mix.check_output(["bird", "-c", str(d / "bird.conf"), "-s", str(d / "bird.ctl"), "-P", str(d / "bird.pid")])
    spec = {"mode": "bgp", "name": "mix1", "vips": VIPS,
            "bgp": {"speaker": "external", "control_socket": str(d / "bird.ctl"), "poll_interval": 0.5,
                    "run_dir": str(run / "unused")}}
    drv = Driver(mix, spec, run / "mix1.driver.log")
    try:
        st = drv.call("start")["status"]
        assert st["speaker"] == "external" and st["speaker_pid"] is None
        drv.call("update", forwardable=VIPS)
        wait_for(lambda: hops(topo) == {VIP4: [MIX1], VIP6: [MIX1_6]}, 30, what="announced through the operator's BIRD")
        wait_for(lambda: len(drv.status()["neighbors"]) == 2 and all(n["up"] for n in drv.status()["neighbors"]),
                 10, what="the operator's sessions read")
        drv.call("update", forwardable=[])
        wait_for(lambda: hops(topo) == {VIP4: [], VIP6: []}, 5, 0.005, what="withdrawn")
        drv.close(keep=False)
        assert not (run / "unused").exists()  # external: the agent starts no speaker of its own
        assert stop_daemon(int((d / "bird.pid").read_text()), str(d))  # the operator's: still running till now
    finally:
        drv.kill()


def test_external_frr_exports_the_table(net):
    need_program("vtysh")
    topo, run, frr_pids = net
    mix = topo["mix2"]
    # FRR's daemons drop to the frr user: their files live in their own run directory
    fdir = Path(f"/var/run/frr/mlbx{os.getpid()}")
    fdir.mkdir(parents=True, exist_ok=True)
    shutil.chown(fdir, "frr", "frr")
    conf = fdir / "frr.conf"
    conf.write_text(FRR_CONF)
    for daemon in ("zebra", "bfdd", "bgpd"):
        pidfile = fdir / f"{daemon}.pid"
        mix.check_output([f"/usr/lib/frr/{daemon}", "-d", "-N", fdir.name, "-f", str(conf), "-i", str(pidfile),
                          "--log", f"file:{fdir / daemon}.log"])
        frr_pids.append(int(pidfile.read_text()))
    spec = {"mode": "bgp", "name": "mix2", "vips": VIPS[:1], "bgp": {"speaker": "external"}}
    drv = Driver(mix, spec, run / "mix2.driver.log")
    try:
        drv.call("start")
        st = drv.call("update", forwardable=VIPS[:1])["status"]
        assert st["neighbors"] is None  # FRR's sessions: unknown to the agent
        took = wait_for(lambda: hops(topo)[VIP4] == [MIX2], 60, 0.1, what="announced through FRR")
        print(f"FRR: the VIP on the router {took:.1f} s after the route was added (session set-up included)")
        drv.call("update", forwardable=[])
        out = wait_for(lambda: hops(topo)[VIP4] == [], 5, 0.005, what="withdrawn through FRR")
        print(f"FRR: withdrawn on the router after {out * 1000:.0f} ms")
        drv.close(keep=False)
    finally:
        drv.kill()


def test_settings_in_external_mode_need_no_neighbours():
    # nothing to render: the operator's daemon has the neighbours
    s = replace(BgpSettings(), speaker="external")
    assert s.neighbors == () and s.local_asn == 0

"""BGP announcement with real BIRD on both ends: a router namespace running the lab's
router BIRD (multipath, BFD) and mix namespaces, each with a managed speaker driven by
the announcer (tests/announce/driver.py, in the mix's namespace as the agent would run
it). The router's kernel route is what is checked, as a client's packets would use it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

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
from tests.announce.netns_helpers import Driver, RouteMonitor, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

ROUTER4, ROUTER6 = "10.88.0.1", "fd88::1"
VIP4, VIP6 = "198.19.88.1", "fd00:88:63::1"
VIPS = [f"{VIP4}:80/tcp", f"[{VIP6}]:80/tcp"]
MIXES = ["mix1", "mix2", "mix3"]
UNREACHABLE = "10.88.0.250"


def addr4(i: int) -> str:
    return f"10.88.0.{10 + i}"


def addr6(i: int) -> str:
    return f"fd88::{10 + i:x}"


class Net:
    def __init__(self, topo: Topology, run: Path) -> None:
        self.topo = topo
        self.run = run
        self.router = topo["router"]
        self.drivers: dict[str, Driver] = {}

    def spec(self, i: int, **bgp) -> dict:
        name = f"mix{i}"
        b = {
            "local_asn": MIX_ASN,
            "neighbors": [{"address": ROUTER4, "asn": ROUTER_ASN}, {"address": ROUTER6, "asn": ROUTER_ASN}],
            "run_dir": str(self.run / name),
            "log": str(self.run / f"{name}.bird.log"),
            "poll_interval": 0.5,
        }
        b.update(bgp)
        return {"mode": "bgp", "name": name, "router_id": addr4(i), "vips": VIPS, "bgp": b}

    def driver(self, i: int, **bgp) -> Driver:
        name = f"mix{i}"
        d = Driver(self.topo[name], self.spec(i, **bgp), self.run / f"{name}.driver.log")
        self.drivers[name] = d
        return d

    def hops(self) -> dict[str, list[str]]:
        return next_hops(self.router, [VIP4, VIP6])

    def hops_are(self, mixes: list[int]) -> bool:
        h = self.hops()
        return h[VIP4] == [addr4(i) for i in mixes] and h[VIP6] == sorted(addr6(i) for i in mixes)


@pytest.fixture(scope="module")
def net():
    need_program("bird")
    topo = Topology(f"mlba{os.getpid()}")
    run = Path(f"/tmp/mlba{os.getpid()}")
    run.mkdir(mode=0o700)
    n = None
    try:
        topo.add_bridge("br")
        router = topo.add_namespace("router")
        topo.connect(router, "br", addresses=[f"{ROUTER4}/24", f"{ROUTER6}/64"])
        topo.enable_forwarding(router)
        topo.enable_l4_multipath_hash(router)
        for i in range(1, 5):
            topo.connect(topo.add_namespace(f"mix{i}"), "br", addresses=[f"{addr4(i)}/24", f"{addr6(i)}/64"])
        # mix4 is the bad neighbour: the router knows only its IPv4 address
        peers = [(f"mix{i}", [addr4(i), addr6(i)]) for i in (1, 2, 3)] + [("mix4", [addr4(4)])]
        RouterBird(run).start(router, router_config(ROUTER4, peers))
        n = Net(topo, run)
        for i in (1, 2, 3):
            n.driver(i).call("start")
        yield n
    finally:
        if n is not None:
            for d in n.drivers.values():
                with contextlib.suppress(Exception):
                    d.close(keep=False)
        for pid, marker in daemon_pids_under(run):
            assert stop_daemon(pid, marker), f"BIRD {pid} would not stop"
        leftovers = topo.teardown()
        shutil.rmtree(run, ignore_errors=True)
        assert leftovers == []


def _announce_all(net: Net, mixes=(1, 2, 3)) -> None:
    for i in mixes:
        net.drivers[f"mix{i}"].call("update", forwardable=VIPS)


def test_router_route_follows_announce_and_withdraw(net):
    _announce_all(net)
    took = wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="ECMP over three mixes")
    print(f"first announcement on the router after {took:.2f} s (sessions coming up)")
    st = net.drivers["mix1"].status()
    assert st["announced"] == sorted([VIP4, VIP6]) and st["speaker_state"] == "running", st
    wait_for(lambda: all(n["up"] for n in net.drivers["mix1"].status()["neighbors"]), 10, what="sessions up")
    n = net.drivers["mix1"].status()["neighbors"]
    assert {x["address"] for x in n} == {ROUTER4, ROUTER6} and all(x["bfd"] == "Up" for x in n), n

    mix2 = net.drivers["mix2"]
    start = time.monotonic()
    mix2.call("update", forwardable=[])  # mix2 cannot forward any more
    out = wait_for(lambda: net.hops_are([1, 3]), 5, 0.005, what="mix2 withdrawn")
    print(f"withdrawal on the router's kernel after {out * 1000:.0f} ms")
    assert mix2.status()["counters"]["withdrawn"] == 2
    # one of the address's VIPs without a table: the address is not announced
    mix2.call("update", forwardable=[VIPS[1]])
    back = wait_for(lambda: net.hops()[VIP6] == sorted(addr6(i) for i in (1, 2, 3)), 5, 0.005, what="v6 back")
    print(f"announcement on the router's kernel after {back * 1000:.0f} ms")
    assert net.hops()[VIP4] == [addr4(1), addr4(3)]
    mix2.call("update", forwardable=VIPS)
    wait_for(lambda: net.hops_are([1, 2, 3]), 5, what="mix2 back")
    del start


def test_frozen_speaker_is_withdrawn_by_bfd(net):
    _announce_all(net)
    wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="ECMP over three mixes")
    pid = net.drivers["mix3"].status()["speaker_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        took = wait_for(lambda: net.hops_are([1, 2]), 5, 0.005, what="frozen mix3 withdrawn")
        print(f"frozen speaker out of the router's route after {took:.2f} s (BFD 100 ms x 3, hold time 9 s)")
        assert took < 3.0  # well below the hold time: BFD did it
    finally:
        os.kill(pid, signal.SIGCONT)
    back = wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="mix3 back after it thawed")
    print(f"thawed speaker back after {back:.2f} s")
    assert net.drivers["mix3"].status()["speaker_pid"] == pid  # not replaced: it answered again in time


def test_agent_kill_and_restart_withdraws_nothing(net):
    _announce_all(net)
    wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="ECMP over three mixes")
    old = net.drivers["mix1"]
    pid = old.status()["speaker_pid"]
    lost: list[dict] = []
    polls = 0
    stop = threading.Event()

    def watch():
        nonlocal polls
        while not stop.is_set():
            h = net.hops()
            polls += 1
            if addr4(1) not in h[VIP4] or addr6(1) not in h[VIP6]:
                lost.append(h)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    monitor = RouteMonitor(net.router)
    watcher.start()
    try:
        old.kill()
        new = net.driver(1)  # a new announcer object in a new process
        st = new.call("start")["status"]
        assert st["speaker_pid"] == pid and st["counters"]["speaker_adoptions"] == 1, st
        assert st["counters"]["speaker_starts"] == 0 and st["announced"] == sorted([VIP4, VIP6]), st
        st = new.call("update", forwardable=VIPS)["status"]
        assert st["counters"]["withdrawn"] == 0 and st["counters"]["announced"] == 0, st
        time.sleep(1.0)
        # a restart with one more neighbour: BIRD is reconfigured, the existing sessions stay
        new.kill()
        spec = net.spec(1)
        extra = [*spec["bgp"]["neighbors"], {"address": UNREACHABLE, "asn": ROUTER_ASN}]
        again = net.driver(1, neighbors=extra)
        st = again.call("start")["status"]
        assert st["speaker_pid"] == pid and st["counters"]["speaker_reconfigurations"] == 1, st
        again.call("update", forwardable=VIPS)
        time.sleep(2.0)
    finally:
        stop.set()
        watcher.join()
    assert polls > 10 and lost == [], f"mix1 missing from the router's route in {len(lost)} of {polls} polls"
    # the monitor sees a withdrawal when there is one
    again.call("update", forwardable=[])
    wait_for(lambda: net.hops_are([2, 3]), 5, 0.005, what="mix1 withdrawn")
    time.sleep(0.2)
    monitor.stop()
    events = [e for e in monitor.events() if e[1] == VIP4]
    assert events, monitor.lines
    *during, last = events
    assert last[0] or addr4(1) not in last[2], events
    changed = [e for e in during if e[0] or addr4(1) not in e[2]]
    assert changed == [], f"the router's route lost mix1 during the restarts: {changed}"
    # back to the fixture's neighbours
    again.kill()
    net.driver(1).call("start")
    net.drivers["mix1"].call("update", forwardable=VIPS)


def test_speaker_crash_is_reported_and_restarted(net):
    _announce_all(net)
    wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="ECMP over three mixes")
    d = net.drivers["mix2"]
    before = d.status()
    os.kill(before["speaker_pid"], signal.SIGKILL)
    out = wait_for(lambda: net.hops_are([1, 3]), 5, 0.005, what="crashed speaker withdrawn")
    print(f"killed speaker out of the router's route after {out * 1000:.0f} ms")
    back = wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="restarted speaker announces again")
    print(f"restarted speaker back on the router after {back:.2f} s")
    st = d.status()
    assert st["speaker_pid"] != before["speaker_pid"], st
    assert st["counters"]["speaker_starts"] == before["counters"]["speaker_starts"] + 1, st
    assert st["announced"] == sorted([VIP4, VIP6]), st
    assert "is gone" in d.log.read_text()  # the agent's log says why


def test_bad_neighbours_are_reported_and_retried(net):
    wrong_asn = ROUTER_ASN + 99
    bad = net.driver(4, neighbors=[
        {"address": ROUTER4, "asn": wrong_asn},   # the router answers as AS ROUTER_ASN
        {"address": ROUTER6, "asn": ROUTER_ASN},  # the router has no session for this address
        {"address": UNREACHABLE, "asn": ROUTER_ASN},  # nobody there
    ])
    bad.call("start")
    bad.call("update", forwardable=VIPS)

    def errors():
        n = {x["address"]: x for x in bad.status()["neighbors"]}
        got = {a: n[a]["last_error"] for a in (ROUTER4, ROUTER6, UNREACHABLE)}
        return got if all(got.values()) and not any(x["up"] for x in n.values()) else None

    wait_for(errors, 30, 0.2, what="a reason for every failed session")
    got = errors()
    print(f"bad neighbours: {got}")
    assert "Bad peer AS" in got[ROUTER4], got
    assert any(w in got[ROUTER6] for w in ("refused", "rejected", "closed", "Connection")), got
    assert any(w in got[UNREACHABLE] for w in ("No route to host", "timed out", "unreachable")), got
    st = bad.status()
    assert st["announced"] == sorted([VIP4, VIP6]) and st["speaker_state"] == "running", st
    assert addr4(4) not in net.hops()[VIP4]
    # put right: the restarted announcer reconfigures the running speaker, and it connects
    bad.kill()
    good = net.driver(4, neighbors=[{"address": ROUTER4, "asn": ROUTER_ASN}])
    st = good.call("start")["status"]
    assert st["counters"]["speaker_reconfigurations"] == 1, st
    good.call("update", forwardable=VIPS)
    took = wait_for(lambda: addr4(4) in net.hops()[VIP4], 30, what="mix4 announced once its ASN is right")
    print(f"mix4 on the router {took:.2f} s after its configuration was put right")
    good.close(keep=False)
    wait_for(lambda: addr4(4) not in net.hops()[VIP4], 5, what="mix4 gone")


def test_speaker_that_cannot_start_is_reported_and_the_routes_still_kept(net):
    broken = net.driver(4, bird="/nonexistent/bird", run_dir=str(net.run / "mix4-broken"))
    st = broken.call("start")["status"]
    assert st["speaker_state"] == "failed" and "/nonexistent/bird" in st["speaker_error"], st
    st = broken.call("update", forwardable=VIPS)["status"]
    assert st["announced"] == sorted([VIP4, VIP6]), st  # the kernel table does not wait for the speaker
    time.sleep(2.5)
    assert broken.status()["counters"]["speaker_errors"] >= 2  # retried, with backoff
    broken.close(keep=False)
    assert broken.proc.returncode == 0


def test_leave_withdraws_then_stops_the_speaker(net):
    _announce_all(net)
    wait_for(lambda: net.hops_are([1, 2, 3]), 30, what="ECMP over three mixes")
    d = net.drivers["mix3"]
    pid = d.status()["speaker_pid"]
    d.call("withdraw_all")
    took = wait_for(lambda: net.hops_are([1, 2]), 5, 0.005, what="leaving mix3 withdrawn")
    print(f"leave: withdrawn on the router after {took * 1000:.0f} ms")
    d.call("update", forwardable=VIPS)  # still forwarding while it drains: stays withdrawn
    time.sleep(0.5)
    assert net.hops_are([1, 2])
    d.close(keep=False)
    assert stop_daemon(pid, str(net.run / "mix3"), timeout=0.1)  # already gone
    assert not (net.run / "mix3" / "bird.pid").exists()

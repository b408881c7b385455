"""L2 announcement on one segment with real kernels answering ARP/NDP: a client and three
mixes on a bridge, every mix holding the VIPs on lo (arp_ignore/arp_announce as the
agent sets them) and serving its name on them. An announcer runs in each mix's
namespace (tests/announce/driver.py); the test hands each the cluster view, as the
agent will from gossip. What is checked is the client's side: its neighbour table, the
frames it receives (tshark), and which mix answers its connections.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from meshlb.announce.ownership import owners
from meshlb.lab.netns import Topology
from tests.announce.helpers import need_program
from tests.announce.netns_helpers import Driver, gossip, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

VIP4, VIP6 = "10.89.0.100", "fd89::100"
PORT = 8080
VIPS = [f"{VIP4}:{PORT}/tcp", f"[{VIP6}]:{PORT}/tcp"]
MIXES = ["mix1", "mix2", "mix3"]
ANNOUNCEMENTS = 5

NAME_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", %d))
s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[1].encode())
    c.close()
""" % PORT


class Segment:
    def __init__(self, topo: Topology, run: Path) -> None:
        self.topo = topo
        self.run = run
        self.client = topo["client"]
        self.drivers: dict[str, Driver] = {}
        self.forwardable = {m: VIPS for m in MIXES}

    def driver(self, name: str) -> Driver:
        spec = {"mode": "l2", "name": name, "iface": "eth0", "vips": VIPS,
                "l2": {"announcements": ANNOUNCEMENTS, "announce_interval": 0.3}}
        d = Driver(self.topo[name], spec, self.run / f"{name}.driver.log")
        self.drivers[name] = d
        d.call("start")
        return d

    def gossip(self, members: list[str]) -> list[dict]:
        return gossip({m: self.drivers[m] for m in members}, self.forwardable)

    def holders(self, vip: str, members=MIXES) -> list[str]:
        return [m for m in members if vip in self.topo[m].addresses("eth0")]

    def client_neighbour(self, vip: str) -> str | None:
        for addr, lladdr, _state in self.client.neighbours("eth0"):
            if addr == vip:
                return lladdr
        return None

    def ask(self, vip: str, timeout: float = 2.0) -> str:
        """Which mix answers a new connection from the client."""
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET

        def op() -> str:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((vip, PORT))
                return s.recv(64).decode()

        return self.client.run(op)


@pytest.fixture(scope="module")
def seg():
    topo = Topology(f"mlbl{os.getpid()}")
    run = Path(f"/tmp/mlbl{os.getpid()}")
    run.mkdir(mode=0o700)
    s = None
    try:
        topo.add_bridge("br")
        client = topo.add_namespace("client")
        topo.connect(client, "br", addresses=["10.89.0.2/24", "fd89::2/64"])
        for i, m in enumerate(MIXES, start=1):
            ns = topo.add_namespace(m)
            topo.connect(ns, "br", addresses=[f"10.89.0.1{i}/24", f"fd89::1{i}/64"])
            topo.add_loopback_vip(ns, VIP4)
            topo.add_loopback_vip(ns, VIP6)
            srv = ns.popen([shutil.which("python3") or "python3", "-c", NAME_SERVER, m],
                           stdout=subprocess.PIPE, text=True)
            assert srv.stdout.readline().strip() == "ready"
        s = Segment(topo, run)
        for m in MIXES:
            s.driver(m)
        yield s
    finally:
        if s is not None:
            for d in s.drivers.values():
                with contextlib.suppress(Exception):
                    d.close(keep=False)
        leftovers = topo.teardown()
        shutil.rmtree(run, ignore_errors=True)
        assert leftovers == []


def expected_owner(vip: str, members: list[str], claims: dict | None = None) -> str:
    return owners([vip], {m: {vip} for m in members}, claims or {})[vip]


class Capture:
    """tshark on the client's interface: the announcements it receives."""

    FIELDS = ["eth.src", "arp.opcode", "arp.src.proto_ipv4", "arp.dst.proto_ipv4", "icmpv6.type",
              "icmpv6.nd.na.target_address", "icmpv6.nd.na.flag.o"]

    def __init__(self, seg: Segment, seconds: float) -> None:
        tshark = need_program("tshark")
        argv = [tshark, "-i", "eth0", "-l", "-n", "-Q", "-f", "arp or icmp6", "-a", f"duration:{seconds:g}",
                "-T", "fields", "-E", "separator=|"]
        for f in self.FIELDS:
            argv += ["-e", f]
        self.proc = seg.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)  # tshark takes a moment to open its capture

    def frames(self) -> list[dict[str, str]]:
        out, _ = self.proc.communicate(timeout=60)
        return [dict(zip(self.FIELDS, line.split("|"))) for line in out.splitlines() if line.strip()]


def test_each_vip_gets_one_owner_that_answers_the_client(seg):
    seg.gossip(MIXES)
    for vip in (VIP4, VIP6):
        owner = expected_owner(vip, MIXES)
        assert seg.holders(vip) == [owner]
        assert seg.ask(vip) == owner
        assert seg.client_neighbour(vip) == seg.topo[owner].mac("eth0")
        assert seg.drivers[owner].status()["counters"]["announcements_sent"] >= 1


def test_crashed_owner_is_replaced_and_the_client_cache_moves(seg):
    seg.gossip(MIXES)
    victim = expected_owner(VIP4, MIXES)
    survivors = [m for m in MIXES if m != victim]
    lost = [v for v in (VIP4, VIP6) if seg.holders(v) == [victim]]
    for vip in lost:
        assert seg.ask(vip) == victim  # the client's cache has the victim's MAC
    cap = Capture(seg, 5)
    # the crash: agent killed, its interface dead, its addresses gone (as after a reboot)
    seg.drivers[victim].kill()
    ns = seg.topo[victim]
    ns.check_output(["ip", "link", "set", "eth0", "down"])
    for vip, plen in ((VIP4, 32), (VIP6, 128)):
        with contextlib.suppress(subprocess.CalledProcessError):
            ns.check_output(["ip", "addr", "del", f"{vip}/{plen}", "dev", "eth0"])
    detected = time.monotonic()
    seg.gossip(survivors)  # the survivors' view no longer has the victim
    new = {vip: expected_owner(vip, survivors) for vip in lost}
    for vip in lost:
        mac = seg.topo[new[vip]].mac("eth0")
        wait_for(lambda vip=vip, mac=mac: seg.client_neighbour(vip) == mac, 3, 0.01,
                 what=f"client's neighbour entry for {vip} on the new owner")
        print(f"{vip}: client's cache moved to {new[vip]} {time.monotonic() - detected:.3f} s "
              f"after the view changed, without the client asking")
    frames = cap.frames()
    for vip in lost:
        mac = seg.topo[new[vip]].mac("eth0")
        if ":" in vip:
            seen = [f for f in frames if f["eth.src"] == mac and f["icmpv6.type"] == "136"
                    and f["icmpv6.nd.na.target_address"] == vip and f["icmpv6.nd.na.flag.o"] in ("1", "True")]
        else:
            seen = [f for f in frames if f["eth.src"] == mac and f["arp.opcode"] == "1"
                    and f["arp.src.proto_ipv4"] == vip == f["arp.dst.proto_ipv4"]]
        assert len(seen) == ANNOUNCEMENTS, (vip, frames)
        assert seg.ask(vip) == new[vip]
        assert seg.holders(vip) == [new[vip]]


def test_a_mix_that_comes_back_takes_nothing_back(seg):
    victim = next(m for m in MIXES if seg.drivers[m].proc.poll() is not None)  # crashed above
    before = {vip: seg.holders(vip) for vip in (VIP4, VIP6)}
    seg.topo[victim].check_output(["ip", "link", "set", "eth0", "up"])
    seg.driver(victim)
    seg.gossip(MIXES)
    assert {vip: seg.holders(vip) for vip in (VIP4, VIP6)} == before
    assert seg.drivers[victim].status()["owned"] == []
    assert expected_owner(VIP4, MIXES) == victim  # it would have been the owner on an empty segment


def test_graceful_leave_hands_over_without_a_failed_connection(seg):
    seg.gossip(MIXES)
    (leaver,) = seg.holders(VIP4)
    failures: list[str] = []
    answers: list[str] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                answers.append(seg.ask(VIP4, timeout=1.0))
            except OSError as exc:
                failures.append(repr(exc))
            time.sleep(0.01)

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.5)
        seg.drivers[leaver].call("withdraw_all")
        seg.forwardable[leaver] = VIPS  # it still forwards while it drains
        history = seg.gossip(MIXES)
        # first round: the successor took the VIP while the leaver still held it
        first = history[0]
        successor = expected_owner(VIP4, [m for m in MIXES if m != leaver])
        assert VIP4 in first[successor]["owned"] and VIP4 in first[leaver]["owned"], first
        assert history[1][leaver]["conflicts"].get(VIP4) == sorted([leaver, successor])  # seen, then released
        # then it released, once it saw the successor's claim
        assert seg.holders(VIP4) == [successor]
        time.sleep(1.0)
    finally:
        stop.set()
        t.join()
    assert failures == [], failures
    assert leaver in answers and answers[-1] == successor, answers[-20:]
    # released from eth0 only: the leaver still takes the VIP's packets (its lo route)
    route = seg.topo[leaver].check_output(["ip", "route", "get", VIP4])
    assert route.startswith("local "), route


def test_two_owners_after_a_partition_resolve_to_one(seg):
    (holder,) = seg.holders(VIP4)
    # the leaver above comes back as a fresh agent, cut off from the others
    loner = next(m for m in MIXES if seg.drivers[m].status()["leaving"])
    seg.drivers[loner].kill()
    seg.driver(loner)
    seg.gossip([loner])  # its view: itself alone -> it takes every VIP
    others = [m for m in MIXES if m != loner]
    seg.gossip(others)
    assert sorted(seg.holders(VIP4)) == sorted([loner, holder])
    history = seg.gossip(MIXES)  # healed
    assert history[0][holder]["conflicts"].get(VIP4) == sorted([loner, holder])
    winner = expected_owner(VIP4, MIXES, {loner: {VIP4}, holder: {VIP4}})
    assert seg.holders(VIP4) == [winner]
    assert history[-1][winner]["conflicts"] == {}

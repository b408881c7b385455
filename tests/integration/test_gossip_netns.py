"""Gossip between network namespaces: three members on a bridge, one per namespace.

The bridge sits in a namespace of its own; each member runs in a child process
started inside its namespace (this file, run as a script, is the child). Children
report on stdout as JSON lines and take commands on stdin, so the test sees what
each member sees without sharing a process (or a network namespace) with it.

One test per mode: unicast with seeds, multicast and broadcast without any seed (so
discovery has to go through the group). A raw-datagram test per group mode checks
the socket setup on its own, independently of the protocol.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEY_HEX = "7d" * 32
LABEL = "netns-test"
SUBNET = "10.77.0"
SUBNET6 = "fd77:77::"
PORT = 7946


# --- the child side ---------------------------------------------------------------------

def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _event_dict(ev) -> dict:
    out = {"ev": type(ev).__name__}
    member = getattr(ev, "member", None)
    if member is not None:
        out["member"] = member.name
        status = getattr(member, "status", None)
        out["status"] = getattr(status, "name", str(status))
    flow = getattr(ev, "tuple", None)
    if flow is not None:
        out["tuple"] = [flow.client, flow.client_port, flow.vip, flow.vip_port, flow.proto]
        out["origin"] = getattr(ev, "origin", None)
    return out


async def _child_raw(cfg: dict) -> None:
    """Open a transport, send to the group every 50 ms, report what was heard."""
    import asyncio

    from meshlb.cluster.transport import TransportConfig, UdpTransport

    t = UdpTransport(TransportConfig(**cfg["transport"]))
    await t.open()
    _emit({"ready": list(t.address), "group": list(t.group_destination or ())})
    heard: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    end = loop.time() + cfg["duration"]
    while loop.time() < end:
        t.send_group(cfg["name"].encode())
        for data, src in t.take():
            key = f"{data.decode()}@{src[0]}"
            heard[key] = heard.get(key, 0) + 1
        await asyncio.sleep(0.05)
    _emit({"heard": heard, "stats": t.stats.as_dict()})
    t.close()


async def _child_driver(cfg: dict) -> None:
    import asyncio

    from meshlb.cluster.driver import GossipDriver
    from meshlb.cluster.keyring import Keyring
    from meshlb.cluster.messages import FlowTuple
    from meshlb.cluster.protocol_config import ProtocolConfig
    from meshlb.cluster.transport import TransportConfig
    from meshlb.cluster.wire import Wire

    wire = Wire(label=LABEL, keyring=Keyring(bytes.fromhex(cfg["key"])), sender=cfg["name"],
                epoch=int(time.time() * 1000), max_datagram=1400)
    driver = GossipDriver(
        name=cfg["name"], wire=wire, protocol=ProtocolConfig.local(),
        transport=TransportConfig(**cfg["transport"]), peers=cfg.get("peers", ()),
        on_event=lambda ev: _emit(_event_dict(ev)), event_queue=0,
    )
    await driver.start()
    _emit({"ready": list(driver.address)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line:  # parent gone: leave like an agent stopped by its supervisor
            await driver.stop(leave=True)
            return
        cmd, *args = line.split()
        if cmd == "evict":
            driver.publish_eviction(FlowTuple(args[0], int(args[1]), args[2], int(args[3]), int(args[4])))
        elif cmd == "members":
            _emit({"members": {m.name: getattr(m.status, "name", str(m.status)) for m in driver.members()}})
        elif cmd == "stats":
            _emit({"stats": driver.stats})
        elif cmd == "leave":
            await driver.stop(leave=True)
            _emit({"stopped": True, "stats": driver.stats})
            return


def _child_main(cfg: dict) -> None:
    import asyncio

    if cfg.get("uvloop"):
        import uvloop

        uvloop.install()
    asyncio.run(_child_driver(cfg) if cfg["kind"] == "driver" else _child_raw(cfg))


# --- the test side --------------------------------------------------------------------------

class Child:
    """A member process: its output lines in a queue, commands on its stdin."""

    def __init__(self, name: str, proc: subprocess.Popen) -> None:
        self.name = name
        self.proc = proc
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        self._err = threading.Thread(target=self._pump_err, daemon=True)
        self._err.start()
        self.stderr: list[str] = []

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                self.lines.put({"garbage": raw})

    def _pump_err(self) -> None:
        for raw in self.proc.stderr:
            self.stderr.append(raw)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, pred, timeout: float, what: str) -> dict:
        """The first line (seen before or arriving within ``timeout``) matching ``pred``."""
        for obj in self.seen:
            if pred(obj):
                return obj
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                obj = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(obj)
            if pred(obj):
                return obj
        raise AssertionError(
            f"{self.name}: no {what} within {timeout}s; exit={self.proc.poll()} "
            f"seen={self.seen[-20:]} stderr={''.join(self.stderr)[-2000:]}")


def _spawn(ns, name: str, cfg: dict) -> Child:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = ns.popen(
        [sys.executable, "-u", str(Path(__file__).resolve()), json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(REPO), env=env,
    )
    return Child(name, proc)


def _stop(children) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait(timeout=5)


NAMES = ("a", "b", "c")


@pytest.fixture
def lan():
    """Three namespaces on a bridge that lives in a fourth one."""
    from meshlb.lab.netns import Topology

    topo = Topology(prefix=f"mlbgs{os.getpid()}")
    try:
        topo.add_bridge("br")
        for i, n in enumerate(NAMES, start=1):
            topo.add_namespace(n)
            topo.connect(n, "br", ifname="eth0",
                         addresses=[f"{SUBNET}.{i}/24", f"{SUBNET6}{i}/64"])
        yield topo
    finally:
        failures = topo.teardown()
        assert not failures, failures


def _transport(mode: str, i: int, v6: bool = False) -> dict:
    if mode == "unicast":
        return {"mode": mode, "bind": f"{SUBNET6}{i}" if v6 else f"{SUBNET}.{i}", "port": PORT}
    t = {"mode": mode, "interface": "eth0", "port": PORT}
    if v6:
        t["bind"] = f"{SUBNET6}{i}"
    return t


RAW_MODES = [("multicast", False), ("multicast", True), ("broadcast", False)]


@pytest.mark.privileged
@pytest.mark.parametrize("mode,v6", RAW_MODES, ids=["multicast4", "multicast6", "broadcast"])
def test_group_sockets_reach_the_other_namespaces_only(lan, mode, v6):
    children = []
    try:
        for i, n in enumerate(NAMES, start=1):
            cfg = {"kind": "raw", "name": n, "duration": 1.5, "transport": _transport(mode, i, v6)}
            children.append(_spawn(lan[n], n, cfg))
        for c in children:
            c.wait(lambda o: "ready" in o, 10, "ready line")
        results = {c.name: c.wait(lambda o: "heard" in o, 10, "report") for c in children}
    finally:
        _stop(children)
    for i, n in enumerate(NAMES, start=1):
        heard = results[n]["heard"]
        others = {m for m in NAMES if m != n}
        senders = {k.split("@")[0] for k in heard}
        assert senders == others, (n, heard)
        # Each datagram arrives once (no duplicate through the unicast socket), and
        # its source is the sender's unicast address, so it can be answered.
        for k, count in heard.items():
            who, src = k.split("@")
            j = NAMES.index(who) + 1
            assert src == (f"{SUBNET6}{j}" if v6 else f"{SUBNET}.{j}")
            assert count <= 31, (n, k, count)
        stats = results[n]["stats"]
        assert stats["group_sent"] >= 20
        if mode == "broadcast":
            # Broadcasts always loop back to the sender: filtered and counted.
            assert stats["dropped"].get("own", 0) >= 20
        else:
            assert stats["dropped"].get("own", 0) == 0  # IP_MULTICAST_LOOP is off


try:
    import uvloop  # noqa: F401
    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False

GOSSIP_MODES = [
    pytest.param("unicast", False, False, id="unicast"),
    pytest.param("multicast", False, False, id="multicast"),
    pytest.param("broadcast", False, False, id="broadcast"),
    pytest.param("multicast", True, False, id="multicast6"),
    pytest.param("broadcast", False, True, id="broadcast-uvloop",
                 marks=pytest.mark.skipif(not HAVE_UVLOOP and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
                                          reason="uvloop not installed")),
]


@pytest.mark.privileged
@pytest.mark.parametrize("mode,v6,use_uvloop", GOSSIP_MODES)
def test_membership_and_evictions_between_namespaces(lan, mode, v6, use_uvloop):
    children: list[Child] = []
    try:
        for i, n in enumerate(NAMES, start=1):
            cfg = {"kind": "driver", "name": n, "key": KEY_HEX, "transport": _transport(mode, i, v6),
                   "uvloop": use_uvloop}
            if mode == "unicast":
                # Seeds with and without an explicit port: both forms must work.
                cfg["peers"] = [f"{SUBNET}.{j}:{PORT}" if j % 2 else f"{SUBNET}.{j}"
                                for j in range(1, 4) if j != i]
            children.append(_spawn(lan[n], n, cfg))
        by = {c.name: c for c in children}
        for c in children:
            c.wait(lambda o: "ready" in o, 10, "ready line")

        # Everyone sees everyone alive.
        for c in children:
            for other in NAMES:
                if other != c.name:
                    c.wait(lambda o, m=other: o.get("ev") == "MemberUp" and o.get("member") == m,
                           15, f"MemberUp {other}")

        # An eviction published on a reaches b and c, attributed to a.
        by["a"].send("evict 198.18.0.7 40000 10.255.0.1 80 6")
        for n in ("b", "c"):
            ev = by[n].wait(lambda o: o.get("ev") == "EvictionReceived", 10, "EvictionReceived")
            assert ev["tuple"] == ["198.18.0.7", 40000, "10.255.0.1", 80, 6]
            assert ev["origin"] == "a"

        # c leaves gracefully: a and b see it LEFT, not dead.
        by["c"].send("leave")
        by["c"].wait(lambda o: "stopped" in o, 10, "stopped")
        for n in ("a", "b"):
            by[n].wait(lambda o: o.get("ev") == "MemberLeft" and o.get("member") == "c", 10, "MemberLeft c")
            assert not any(o.get("ev") == "MemberDead" and o.get("member") == "c" for o in by[n].seen)
        assert by["c"].proc.wait(timeout=10) == 0

        # b is killed outright: a notices through probing and suspects it.
        by["b"].proc.kill()
        by["a"].wait(lambda o: o.get("ev") in ("MemberSuspect", "MemberDead") and o.get("member") == "b",
                     10, "MemberSuspect b")
        assert not any(o.get("ev") == "MemberLeft" and o.get("member") == "b" for o in by["a"].seen)
    finally:
        _stop(children)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))

"""The UDP transport and the driver, on loopback (127.0.0.x), under asyncio and uvloop.

Socket-level tests use raw datagrams; driver tests run real Nodes behind real Wires
with the ``local`` preset.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from meshlb.cluster.transport import (
    Mode,
    TransportConfig,
    TransportError,
    UdpTransport,
    parse_peer,
    resolve_peers,
)

try:
    import uvloop
except ImportError:  # uvloop is optional (the "fast" extra)
    uvloop = None

# uvloop is installed with the test extras: in CI its absence is a failure, not a skip
LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    uvloop is None and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="uvloop not installed"))]

# Distinct loopback addresses per test process, so concurrent runs do not collide.
_BASE = 10 + os.getpid() % 200


def lo(i: int) -> str:
    return f"127.{_BASE}.{os.getpid() % 250 + 1}.{i}"


def run(loop_kind: str, coro_fn, timeout: float = 30.0):
    async def guarded():
        return await asyncio.wait_for(coro_fn(), timeout)

    if loop_kind == "uvloop":
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(guarded())
    finally:
        loop.close()


async def wait_for(pred, timeout: float = 5.0, step: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


def closed_port(host: str) -> tuple[str, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    addr = s.getsockname()
    s.close()
    return addr


# --- peer specs --------------------------------------------------------------------------

def test_parse_peer_forms():
    assert parse_peer("10.0.0.1", 7946) == ("10.0.0.1", 7946)
    assert parse_peer("10.0.0.1:1234", 7946) == ("10.0.0.1", 1234)
    assert parse_peer("mix-1.example:99", 7946) == ("mix-1.example", 99)
    assert parse_peer("[fd00::1]:5", 7946) == ("fd00::1", 5)
    assert parse_peer("[fd00::1]", 7946) == ("fd00::1", 7946)
    assert parse_peer("fd00::1", 7946) == ("fd00::1", 7946)
    assert parse_peer(("10.0.0.2", 3), 7946) == ("10.0.0.2", 3)
    for bad in ("", "h:0", "h:70000", "[fd00::1", "[fd00::1]x"):
        with pytest.raises(ValueError):
            parse_peer(bad, 7946)


def test_resolve_peers_literals_names_and_failures():
    async def main():
        ok, failed = await resolve_peers(
            ["127.0.0.1:5", "localhost:6", "127.0.0.1:5", "no-such-host.invalid:7", "x:0"], 7946)
        return ok, failed

    ok, failed = run("asyncio", main)
    assert ok[0] == ("127.0.0.1", 5)
    assert ("127.0.0.1", 6) in ok
    assert ok.count(("127.0.0.1", 5)) == 1
    assert failed == ["no-such-host.invalid:7", "x:0"]


# --- configuration errors -------------------------------------------------------------------

def test_config_rejects_nonsense():
    with pytest.raises(TransportError):
        TransportConfig(mode="anycast")
    with pytest.raises(TransportError):
        TransportConfig(queue_size=0)
    with pytest.raises(TransportError):
        TransportConfig(ttl=0)


def test_open_errors_are_transport_errors():
    async def main():
        errs = []
        for cfg in (
            TransportConfig(mode=Mode.MULTICAST),                        # no address at all
            TransportConfig(mode=Mode.UNICAST, interface="nonexistent0"),
            TransportConfig(mode=Mode.BROADCAST, bind="::1"),            # no v6 broadcast
            TransportConfig(bind="not-an-ip"),
        ):
            t = UdpTransport(cfg)
            with pytest.raises(TransportError) as ei:
                await t.open()
            errs.append(str(ei.value))
        # A failure on the group socket releases the unicast socket already bound.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((lo(1), 0))
        port = probe.getsockname()[1]
        probe.close()
        t = UdpTransport(TransportConfig(mode=Mode.MULTICAST, bind=lo(1), port=port, group="10.1.1.1"))
        with pytest.raises(TransportError, match="not a multicast group"):
            await t.open()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # exclusive: fails if still bound
        again.bind((lo(1), port))
        again.close()
        # A taken port is reported, not raised as a bare OSError.
        a = UdpTransport(TransportConfig(bind=lo(1), port=0))
        await a.open()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no SO_REUSEADDR: exclusive
        try:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
            b = UdpTransport(TransportConfig(bind="0.0.0.0", advertise=lo(2), port=port))
            with pytest.raises(TransportError):
                await b.open()
        finally:
            s.close()
            a.close()
        return errs

    errs = run("asyncio", main)
    assert "interface" in errs[0] and "nonexistent0" in errs[1] and "broadcast" in errs[2]


# --- unicast datagrams --------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", LOOPS)
def test_unicast_roundtrip_and_counters(loop_kind):
    async def main():
        a = UdpTransport(TransportConfig(bind=lo(1), port=0))
        b = UdpTransport(TransportConfig(bind=lo(2), port=0))
        await a.open()
        await b.open()
        try:
            assert a.address[0] == lo(1) and a.address[1] > 0
            assert not a.has_group
            assert a.send(b"hello", b.address)
            data, src = await b.recv()
            assert (data, src) == (b"hello", a.address)
            assert b.send(b"back", src)
            assert await a.recv() == (b"back", b.address)
            # GROUP without a group is dropped and counted, not an error.
            assert not a.send_group(b"nobody")
            assert a.stats.dropped["no_group"] == 1
            # A destination of the wrong family is refused locally.
            assert not a.send(b"x", ("::1", 9))
            assert a.stats.dropped["bad_address"] == 1
            sa, sb = a.stats, b.stats
            assert (sa.datagrams_sent, sa.bytes_sent) == (1, 5)
            assert (sb.datagrams_received, sb.bytes_received) == (1, 5)
            assert (sa.datagrams_received, sb.datagrams_sent) == (1, 1)
        finally:
            a.close()
            b.close()
        assert a.closed
        assert not a.send(b"late", b.address)
        assert a.stats.dropped["closed"] == 1
        with pytest.raises(TransportError):
            await a.recv()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_receive_queue_is_bounded_and_drops_are_counted(loop_kind):
    n = 300

    async def main():
        rx = UdpTransport(TransportConfig(bind=lo(3), port=0, queue_size=16))
        await rx.open()
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind((lo(4), 0))
        try:
            for i in range(n):
                tx.sendto(b"flood %d" % i, rx.address)
            assert await wait_for(lambda: rx.stats.datagrams_received >= n)
            assert rx.pending() == 16
            assert rx.stats.dropped["queue_full"] == n - 16
            got = rx.take()
            # The queue keeps the oldest: the first 16 sent, in order.
            assert [d for d, _ in got] == [b"flood %d" % i for i in range(16)]
            assert rx.pending() == 0
            # Room again: new datagrams are queued.
            tx.sendto(b"after", rx.address)
            assert (await rx.recv())[0] == b"after"
        finally:
            tx.close()
            rx.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_kernel_buffer_drops_are_counted(loop_kind):
    n = 500

    async def main():
        rx = UdpTransport(TransportConfig(bind=lo(9), port=0, rcvbuf=4096, queue_size=10_000))
        await rx.open()
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind((lo(10), 0))
        try:
            # No await in between: the reader cannot run, the socket buffer overflows.
            for i in range(n):
                tx.sendto(b"x" * 200, rx.address)
            await asyncio.sleep(0.1)
            # The kernel tells the drop count with the next datagram it does queue.
            tx.sendto(b"last", rx.address)
            def all_accounted():
                rx.take()
                return rx.stats.datagrams_received + rx.stats.dropped["socket_overflow"] == n + 1

            assert await wait_for(all_accounted, 5)
            assert rx.stats.dropped["socket_overflow"] > 0
            assert rx.stats.datagrams_received < n
        finally:
            tx.close()
            rx.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_socket_errors_are_counted_not_raised(loop_kind):
    async def main():
        a = UdpTransport(TransportConfig(bind=lo(5), port=0))
        b = UdpTransport(TransportConfig(bind=lo(6), port=0))
        await a.open()
        await b.open()
        try:
            dead = closed_port(lo(7))
            t0 = time.process_time()
            for _ in range(5):
                assert a.send(b"anyone?", dead)  # accepted by the kernel; ICMP comes later
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            # Without draining the error queue the loop would spin here.
            assert time.process_time() - t0 < 0.25
            if a.recverr:
                assert a.stats.errors["ECONNREFUSED"] >= 1
            # A synchronous failure: broadcast without SO_BROADCAST.
            assert not a.send(b"x", ("255.255.255.255", 9))
            assert a.stats.errors["EACCES"] == 1
            assert a.stats.dropped["send_error"] == 1
            # The socket still works both ways.
            assert a.send(b"still here", b.address)
            assert await b.recv() == (b"still here", a.address)
            assert b.send(b"me too", a.address)
            assert await a.recv() == (b"me too", b.address)
        finally:
            a.close()
            b.close()

    run(loop_kind, main)


def test_pending_icmp_error_does_not_cost_the_next_datagram():
    """Linux reports a pending ICMP error on the next send of a RECVERR socket, failing
    it although that datagram's destination is fine; the transport sends it again."""
    async def main():
        a = UdpTransport(TransportConfig(bind=lo(14), port=0))
        b = UdpTransport(TransportConfig(bind=lo(15), port=0))
        await a.open()
        await b.open()
        try:
            assert a.recverr
            # No await between the two: the reader has no chance to clear the error
            # (on loopback the ICMP is already queued when the first sendto returns).
            assert a.send(b"void", closed_port(lo(16)))
            assert a.send(b"real", b.address)
            assert await b.recv() == (b"real", a.address)
            assert a.stats.errors["ECONNREFUSED"] == 1
            assert a.stats.dropped["send_error"] == 0
        finally:
            a.close()
            b.close()

    run("asyncio", main)


def test_recverr_only_on_the_stdlib_loop():
    async def main():
        t = UdpTransport(TransportConfig(bind=lo(8), port=0))
        await t.open()
        t.close()
        return t.recverr

    assert run("asyncio", main) is True
    if uvloop is not None:
        assert run("uvloop", main) is False


# --- the driver with real nodes -------------------------------------------------------------

KEY = bytes(range(32))


def make_driver(name: str, host: str, peers=(), *, events=None, **transport):
    from meshlb.cluster.driver import GossipDriver
    from meshlb.cluster.keyring import Keyring
    from meshlb.cluster.protocol_config import ProtocolConfig
    from meshlb.cluster.wire import Wire

    wire = Wire(label="transport-test", keyring=Keyring(KEY), sender=name, epoch=1, max_datagram=1400)
    cb = None
    if events is not None:
        cb = lambda ev: events.append((name, ev))  # noqa: E731
    return GossipDriver(
        name=name, wire=wire, protocol=ProtocolConfig.local(),
        transport=TransportConfig(bind=host, port=0, **transport), peers=peers, on_event=cb,
    )


def kinds(events, who, kind, member=None):
    return [ev for n, ev in events if n == who and type(ev).__name__ == kind
            and (member is None or getattr(ev, "member", None) is not None and ev.member.name == member)]


def status_of(driver, name):
    for m in driver.members():
        if m.name == name:
            return m.status.name
    return None


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_three_drivers_join_evict_leave_and_crash(loop_kind):
    from meshlb.cluster.messages import FlowTuple

    async def main():
        events: list = []
        a = make_driver("a", lo(11), events=events)
        await a.start()
        b = make_driver("b", lo(12), [f"{a.address[0]}:{a.address[1]}"], events=events)
        await b.start()
        c = make_driver("c", lo(13), [a.address, f"{b.address[0]}:{b.address[1]}"], events=events)
        await c.start()
        drivers = {"a": a, "b": b, "c": c}
        try:
            # Everyone sees everyone alive.
            assert await wait_for(lambda: all(
                status_of(d, o) == "ALIVE" for d in drivers.values() for o in drivers), 10)
            for who in drivers:
                for other in drivers:
                    if other != who:
                        assert kinds(events, who, "MemberUp", other), (who, other)

            # Idle, the loop sleeps until the node's next deadline: no busy loop.
            w0 = sum(d.counters["wakeups"] for d in drivers.values())
            t0 = time.process_time()
            await asyncio.sleep(1.0)
            assert time.process_time() - t0 < 0.3
            # a busy loop wakes thousands of times a second; right after a join the
            # members still exchange their news (a few dozen wakeups each), more so
            # under uvloop, whose timers have millisecond resolution
            assert sum(d.counters["wakeups"] for d in drivers.values()) - w0 < 400

            # An eviction published on b reaches a and c.
            flow = FlowTuple("198.18.3.4", 51000, "10.255.0.1", 443, 6)
            b.publish_eviction(flow)
            assert await wait_for(lambda: kinds(events, "a", "EvictionReceived")
                                  and kinds(events, "c", "EvictionReceived"), 5)
            for who in ("a", "c"):
                ev = kinds(events, who, "EvictionReceived")[0]
                assert (ev.tuple, ev.origin) == (flow, "b")
            assert not kinds(events, "b", "EvictionReceived")

            # A batch of them in one call; a flow the node refuses is counted and skipped.
            batch = [FlowTuple("198.18.3.4", 52000 + i, "10.255.0.1", 443, 6) for i in range(5)]
            last = b.publish_evictions([*batch[:2], FlowTuple("198.18.3.4", 1, "10.255.0.1", 443, 1),
                                        *batch[2:]])
            assert last == 6  # the one before, then five
            assert b.stats["node"]["evictions_refused"] == 1
            assert await wait_for(lambda: {e.tuple for e in kinds(events, "a", "EvictionReceived")}
                                  >= set(batch), 5)

            # c leaves gracefully: seen LEFT, never suspected.
            t0 = time.monotonic()
            await c.stop(leave=True, timeout=2.0)
            assert time.monotonic() - t0 < 2.5
            assert c.transport.closed and not c.running
            assert await wait_for(lambda: kinds(events, "a", "MemberLeft", "c")
                                  and kinds(events, "b", "MemberLeft", "c"), 5)
            assert status_of(a, "c") == "LEFT" and status_of(b, "c") == "LEFT"
            assert not kinds(events, "a", "MemberSuspect", "c")
            assert not kinds(events, "a", "MemberDead", "c")

            # b is killed (socket closed, no goodbye): a suspects it, then declares it dead.
            b.abort()
            assert await wait_for(lambda: kinds(events, "a", "MemberSuspect", "b"), 8)
            assert await wait_for(lambda: kinds(events, "a", "MemberDead", "b"), 12)
            assert not kinds(events, "a", "MemberLeft", "b")

            st = a.stats
            assert st["transport"]["datagrams_sent"] > 0 and st["transport"]["datagrams_received"] > 0
            assert st["node"]["datagrams_received"] == st["transport"]["datagrams_received"]
            assert st["driver"].get("node_errors", 0) == 0
        finally:
            for d in drivers.values():
                if d.running:
                    d.abort()

    run(loop_kind, main, timeout=60)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_driver_survives_a_flood_and_counts_queue_drops(loop_kind):
    from meshlb.cluster.messages import FlowTuple

    async def main():
        a = make_driver("a", lo(21), queue_size=32)
        await a.start()
        got: list = []
        b = make_driver("b", lo(22), [a.address])
        await b.start()
        consumer = asyncio.ensure_future(_collect(b, got))
        try:
            assert await wait_for(lambda: status_of(a, "b") == "ALIVE" and status_of(b, "a") == "ALIVE", 10)
            # Junk from a stranger: enough of it, fast enough, to overflow a's queue.
            junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            junk.bind((lo(23), 0))
            try:
                for i in range(3000):
                    junk.sendto(b"ML\x01junk %d" % i, a.address)
                    if i % 500 == 499:
                        await asyncio.sleep(0)
            finally:
                junk.close()
            # Every junk datagram is accounted for: received (then queued or dropped
            # because the queue was full) or dropped by the kernel (socket buffer).
            def accounted():
                t = a.stats["transport"]
                return t["datagrams_received"] + t["dropped"].get("socket_overflow", 0) >= 3000

            assert await wait_for(accounted, 5)
            st = a.stats
            assert st["transport"]["dropped"]["queue_full"] > 0
            # What was queued reached the node and was rejected by the Wire, not raised.
            assert sum(v for k, v in st["node"].items() if k.startswith("drop.")) > 0
            assert st["driver"].get("node_errors", 0) == 0
            # Still a working member: an eviction from a reaches b, through events().
            flow = FlowTuple("198.18.9.9", 1234, "10.255.0.1", 80, 17)
            a.publish_eviction(flow)
            assert await wait_for(lambda: any(type(e).__name__ == "EvictionReceived" for e in got), 5)
            assert status_of(b, "a") == "ALIVE"
        finally:
            await b.stop(leave=False)
            await asyncio.wait_for(consumer, 2)  # events() ends when the driver stops
            a.abort()

    run(loop_kind, main, timeout=60)


async def _collect(driver, out: list) -> None:
    async for ev in driver.events():
        out.append(ev)


def test_unresolvable_seed_does_not_stop_the_member():
    async def main():
        a = make_driver("a", lo(31), ["no-such-seed.invalid", "also-missing.invalid:7000"])
        a.resolve_retry = 0.1
        await a.start()
        try:
            assert a.running and a._unresolved == ["no-such-seed.invalid", "also-missing.invalid:7000"]
            # The name is retried in the background without disturbing the member...
            await asyncio.sleep(0.5)
            assert a.running and a._resolver is not None and not a._resolver.done()
            # ...which others can still join.
            b = make_driver("b", lo(32), [a.address])
            await b.start()
            try:
                assert await wait_for(lambda: status_of(a, "b") == "ALIVE", 10)
            finally:
                await b.stop(leave=False)
        finally:
            await a.stop(leave=False)
        assert a._resolver.done() and not a.running

    run("asyncio", main)

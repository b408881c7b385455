"""Health checks against real servers on 127.0.0.1, started by each test."""
from __future__ import annotations

import asyncio
import random
import socket

import pytest

from meshlb.health import CheckFailed, HealthChecker, TargetStatus, http_check, tcp_check


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def closed_port() -> int:
    # bind then close: nothing listens there for the rest of the test
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class HttpServer:
    """Minimal HTTP server whose answer the test changes while it runs."""

    def __init__(self, status: int = 200, *, hang: bool = False, raw: bytes | None = None):
        self.status = status
        self.hang = hang
        self.raw = raw
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            if self.hang:
                await asyncio.sleep(30)
            body = self.raw if self.raw is not None else (
                f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]


async def tcp_server():
    async def handle(reader, writer):
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


# --- single checks ---------------------------------------------------------------------


def test_tcp_up():
    async def main():
        srv = await tcp_server()
        async with srv:
            await tcp_check("127.0.0.1", srv.sockets[0].getsockname()[1], 1.0)

    run(main())


def test_tcp_down_closed_port():
    async def main():
        with pytest.raises(CheckFailed, match="connect failed: .*[Rr]efused"):
            await tcp_check("127.0.0.1", closed_port(), 1.0)

    run(main())


def test_tcp_timeout():
    # a listener whose backlog is full leaves further SYNs unanswered
    async def main():
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                fillers.append(s)
            with pytest.raises(CheckFailed, match="timed out after 0.3s"):
                await tcp_check("127.0.0.1", port, 0.3)
        finally:
            for s in fillers:
                s.close()
            lst.close()

    run(main())


@pytest.mark.parametrize("status", [200, 204, 301, 302])
def test_http_ok(status):
    async def main():
        async with HttpServer(status) as srv:
            assert await http_check("127.0.0.1", srv.port, 1.0, "/healthz") == status
            assert srv.requests[0].startswith(b"GET /healthz HTTP/1.1\r\n")
            assert b"\r\nHost: 127.0.0.1:" in srv.requests[0]

    run(main())


@pytest.mark.parametrize("status", [500, 503, 404, 101])
def test_http_bad_status(status):
    async def main():
        async with HttpServer(status) as srv:
            with pytest.raises(CheckFailed, match=f"^HTTP {status}$"):
                await http_check("127.0.0.1", srv.port, 1.0)

    run(main())


def test_http_timeout():
    async def main():
        async with HttpServer(hang=True) as srv:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(CheckFailed, match="HTTP timed out after 0.2s"):
                await http_check("127.0.0.1", srv.port, 0.2)
            assert loop.time() - t0 < 1.0

    run(main())


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP status line"),
        (b"", "closed before a status line"),
    ],
)
def test_http_garbage(raw, message):
    async def main():
        async with HttpServer(raw=raw) as srv:
            with pytest.raises(CheckFailed, match=message):
                await http_check("127.0.0.1", srv.port, 1.0)

    run(main())


def test_http_down():
    async def main():
        with pytest.raises(CheckFailed, match="HTTP connect failed"):
            await http_check("127.0.0.1", closed_port(), 1.0)

    run(main())


# --- hysteresis ------------------------------------------------------------------------


def test_rise_fall_hysteresis():
    async def main():
        changes: list[tuple[str, bool]] = []
        async with HttpServer(200) as srv:
            hc = HealthChecker(
                {"mix2": ("127.0.0.1", srv.port)},
                kind="http", rise=2, fall=3, timeout=1.0,
                on_change=lambda n, ok: changes.append((n, ok)),
            )
            assert hc.results()["mix2"].ok is False and hc.results()["mix2"].checks == 0

            async def step(status):
                srv.status = status
                return (await hc.check_once("mix2")).ok

            # the first result counts at once
            assert await step(200) is True
            assert changes == [("mix2", True)]
            # fall = 3: two failures are tolerated, the third flips
            assert await step(500) is True
            assert await step(500) is True
            assert changes == [("mix2", True)]
            assert await step(500) is False
            assert changes[-1] == ("mix2", False)
            st = hc.results()["mix2"]
            assert st.last_error == "HTTP 500" and st.failures == 3
            # rise = 2: one success is not enough
            assert await step(200) is False
            # a failure in between restarts the count
            assert await step(500) is False
            assert await step(200) is False
            assert await step(200) is True
            assert changes == [("mix2", True), ("mix2", False), ("mix2", True)]
            # a single failure after recovery does not flip
            assert await step(503) is True
            assert hc.healthy() == {"mix2"}

    run(main())


def test_first_result_down_and_status_fields():
    async def main():
        clock = iter([100.0, 200.0, 300.0])
        hc = HealthChecker({"gone": ("127.0.0.1", closed_port())}, rise=2, fall=2, clock=lambda: next(clock))
        st = await hc.check_once("gone")
        assert isinstance(st, TargetStatus)
        assert st.ok is False and st.checks == 1 and st.changed_at == 100.0
        assert "refused" in st.last_error.lower() and st.latency is None
        # still down, no change recorded
        st = await hc.check_once("gone")
        assert st.changed_at == 100.0 and st.checks == 2 and st.failures == 2

    run(main())


def test_latency_recorded():
    async def main():
        srv = await tcp_server()
        async with srv:
            hc = HealthChecker({"a": ("127.0.0.1", srv.sockets[0].getsockname()[1])})
            st = await hc.check_once("a")
            assert st.ok and st.latency is not None and 0 <= st.latency < 1.0 and st.last_error is None

    run(main())


# --- the running checker ---------------------------------------------------------------


def test_checker_runs_on_interval_and_reports_changes():
    async def main():
        events: asyncio.Queue = asyncio.Queue()

        async def on_change(name, ok):  # async callbacks are awaited
            await events.put((name, ok))

        up = await tcp_server()
        up_port = up.sockets[0].getsockname()[1]
        async with up:
            hc = HealthChecker(
                {"up": ("127.0.0.1", up_port), "down": ("127.0.0.1", closed_port())},
                interval=0.05, timeout=0.5, rise=1, fall=2, on_change=on_change, rng=random.Random(1),
            )
            async with hc:
                got = {await asyncio.wait_for(events.get(), 5) for _ in range(2)}
                assert got == {("up", True), ("down", False)}
                # a few intervals later, checks keep coming
                await asyncio.sleep(0.4)
                assert hc.results()["up"].checks >= 3
                assert hc.healthy() == {"up"}

                # the backend goes away: after `fall` failures it is reported down
                up.close()
                await up.wait_closed()
                assert await asyncio.wait_for(events.get(), 5) == ("up", False)
            # stopped: no task keeps running
            n = hc.results()["up"].checks
            await asyncio.sleep(0.2)
            assert hc.results()["up"].checks == n

    run(main())


def test_set_targets_keeps_state_and_resets_readdressed():
    async def main():
        srv = await tcp_server()
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            hc = HealthChecker({"a": ("127.0.0.1", port), "b": ("127.0.0.1", port)}, interval=10)
            await hc.check_once("a")
            await hc.check_once("b")
            hc.set_targets({"a": ("127.0.0.1", port), "b": ("127.0.0.1", closed_port()), "c": ("127.0.0.1", port)})
            r = hc.results()
            assert r["a"].ok and r["a"].checks == 1
            assert not r["b"].ok and r["b"].checks == 0
            assert r["c"].checks == 0
            hc.set_targets({})
            assert hc.results() == {}
            with pytest.raises(KeyError):
                await hc.check_once("a")

    run(main())


def test_set_targets_while_running_starts_and_cancels_loops():
    async def main():
        seen = asyncio.Event()
        srv = await tcp_server()
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            hc = HealthChecker({}, interval=0.05, on_change=lambda n, ok: seen.set())
            async with hc:
                hc.set_targets({"late": ("127.0.0.1", port)})
                await asyncio.wait_for(seen.wait(), 5)
                assert hc.results()["late"].ok
                hc.set_targets({})
                await asyncio.sleep(0)
                assert not hc._tasks

    run(main())


def test_callback_error_does_not_stop_checks():
    async def main():
        srv = await tcp_server()
        async with srv:
            def boom(name, ok):
                raise RuntimeError("callback broke")

            hc = HealthChecker({"a": ("127.0.0.1", srv.sockets[0].getsockname()[1])}, interval=0.03, on_change=boom)
            async with hc:
                await asyncio.sleep(0.3)
            assert hc.results()["a"].checks >= 3
            assert hc.results()["a"].ok

    run(main())


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "udp"}, {"interval": 0}, {"timeout": -1}, {"rise": 0}, {"fall": 0}, {"jitter": 1.0}],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        HealthChecker({}, **kwargs)


def test_on_result_counts_every_check_and_result_lookup():
    async def main():
        seen: list[tuple[str, bool]] = []
        async with HttpServer(200) as srv:
            hc = HealthChecker({"m": ("127.0.0.1", srv.port)}, kind="http", fall=5,
                               on_result=lambda n, ok: seen.append((n, ok)))
            await hc.check_once("m")
            srv.status = 500
            await hc.check_once("m")
            # on_result reports each check's own outcome, unfiltered by hysteresis
            assert seen == [("m", True), ("m", False)]
            assert hc.result("m").ok is True
            assert hc.result("nobody") is None

    run(main())


def test_from_config_and_reconfigure_keep_state():
    from meshlb.config import HealthConfig

    async def main():
        srv = await tcp_server()
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            hc = HealthChecker.from_config(HealthConfig(interval=3.0, timeout=0.5, rise=4, fall=5),
                                           targets={"a": ("127.0.0.1", port)})
            assert (hc.interval, hc.timeout, hc.kind, hc.rise, hc.fall) == (3.0, 0.5, "tcp", 4, 5)
            await hc.check_once("a")
            hc.reconfigure(HealthConfig(interval=1.0, kind="http", http_path="/h", fall=1))
            assert (hc.interval, hc.kind, hc.http_path, hc.fall) == (1.0, "http", "/h", 1)
            st = hc.result("a")
            assert st.ok and st.checks == 1
            # the new kind is used: a bare TCP server is not an HTTP server, fall=1 flips at once
            st = await hc.check_once("a")
            assert not st.ok and "HTTP" in st.last_error

    run(main())

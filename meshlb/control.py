"""The agent's local control API: one JSON request per line over a unix socket.

The socket is created mode 0600 and owned by the agent's user (root), so only root
can read cluster state or flush conntrack. Each connection carries one request
``{"op": NAME, "args": {...}}`` and gets one response line: ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": "one line"}``.

The server side is a table of async handlers the agent registers; this module knows
nothing of what they do, so the CLI and the agent share only the wire shape here.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("meshlb.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """A request the agent refused, or an agent that cannot be reached; one line."""


class ControlServer:
    def __init__(self, path: str | os.PathLike[str], handlers: dict[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._remove_stale()
        # umask around bind: the socket must never exist, even for an instant,
        # with permissions wider than 0600
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def _remove_stale(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # nobody listens: left by a killed agent
            return
        finally:
            probe.close()
        raise ControlError(f"another agent is already serving {self.path}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            response = await self._dispatch(line)
            writer.write(json.dumps(response, separators=(",", ":"), default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": "request too large"}
        try:
            request = json.loads(line)
            op = request["op"]
            args = request.get("args") or {}
            if not isinstance(op, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        handler = self.handlers.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown operation {op!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a handler bug must not take the agent down
            log.exception("control operation %s failed", op)
            return {"ok": False, "error": f"{op} failed: {exc}"}


def call(path: str | os.PathLike[str], op: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Blocking client used by the CLI. Raises ControlError with a one-line reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"agent not running (no control socket at {path})") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (the control socket is root only)") from None
        except ConnectionRefusedError:
            raise ControlError(f"agent not running (stale control socket at {path})") from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise ControlError(f"{path} is not a control socket") from None
            raise ControlError(f"cannot reach agent at {path}: {exc.strerror}") from None
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise ControlError(f"agent at {path} did not answer within {timeout:g} s") from None
    finally:
        sock.close()
    try:
        response = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"agent at {path} sent a malformed answer") from None
    if not response.get("ok"):
        raise ControlError(response.get("error") or "agent refused the request")
    return response.get("result")

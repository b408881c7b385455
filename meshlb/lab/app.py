"""The lab's application: a small HTTP/1.1 server that answers with its node name.

It listens on every address (so it serves the VIP on loopback in dr mode and the
node's own address in nat mode), keeps connections alive for wrk, and closes them
for ab (HTTP/1.0 without keep-alive). Run: python3 -m meshlb.lab.app NAME [PORT].
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

MAX_HEADER = 16 * 1024


async def _serve(name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = name + b"\n"
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                break
            except asyncio.IncompleteReadError:
                break
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split()
            if len(parts) != 3:
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                break
            lower = headers.lower()
            version = parts[2]
            keep = (version == b"HTTP/1.1" and b"connection: close" not in lower) or (
                version == b"HTTP/1.0" and b"connection: keep-alive" in lower
            )
            if b"content-length:" in lower:  # discard a request body; the lab only GETs
                for line in lower.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1].strip() or b"0")
                        if length:
                            await reader.readexactly(min(length, MAX_HEADER))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode()
                + (b"\r\nConnection: keep-alive\r\n\r\n" if keep else b"\r\nConnection: close\r\n\r\n")
                + (body if parts[0] != b"HEAD" else b"")
            )
            await writer.drain()
            if not keep:
                break
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(name: str, port: int, host: str | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        lambda r, w: _serve(name.encode(), r, w), host=host, port=port, backlog=4096, limit=MAX_HEADER, reuse_address=True
    )
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python3 -m meshlb.lab.app NAME [PORT]", file=sys.stderr)
        return 2
    name = argv[0]
    port = int(argv[1]) if len(argv) > 1 else 80
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(name, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

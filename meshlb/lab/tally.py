"""Who answers: N new connections to a URL of the lab's demo application, counted by the
name each answer carries (the demo app answers with its node's name).

    meshlb lab exec client -- python3 -m meshlb.lab.tally http://198.19.0.1/ -n 30000 -c 50

Each request is a connection of its own (``Connection: close``), so each is a new flow
that the balancers place by their tables. Prints one JSON object: ``{"answers": {name:
count}, "failed": count, "errors": {reason: count}, "seconds": s}``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit


async def _one(host: str, port: int, path: str, timeout: float) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"status {head[:20]!r}")
    return body.decode(errors="replace").strip() or "(empty)"


async def tally(url: str, n: int, concurrency: int, timeout: float = 5.0) -> dict[str, object]:
    u = urlsplit(url)
    host = (u.hostname or "").strip("[]")
    port = u.port or 80
    path = u.path or "/"
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            try:
                answers[await _one(host, port, path, timeout)] += 1
            except (OSError, TimeoutError, ValueError) as exc:
                errors[type(exc).__name__ if not str(exc) else str(exc)[:60]] += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return {"answers": dict(sorted(answers.items())), "failed": sum(errors.values()), "errors": dict(errors),
            "seconds": round(time.monotonic() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m meshlb.lab.tally", description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=1000, help="connections (default 1000)")
    ap.add_argument("-c", type=int, default=20, help="at once (default 20)")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    out = asyncio.run(tally(args.url, args.n, args.c, args.timeout))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

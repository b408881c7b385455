"""Runs one announcer in the namespace it was started in, as an agent would, driven by
JSON lines on stdin; answers each with a JSON line (``{"ok": ..., "status": ...}``).

    {"op": "start"} | {"op": "update", "forwardable": [...], "ready": {...}, "claims": {...}}
    {"op": "withdraw_all"} | {"op": "stop", "keep": bool} | {"op": "status"}

Argument: the settings as JSON ({"mode": ..., "bgp": {...}, "l2": {...}, "name": ...,
"iface": ..., "router_id": ..., "vips": [...]}). Killing this process (SIGKILL) is an
agent's crash: whatever the announcer put in the kernel or started stays.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys

from meshlb.announce import make_announcer
from meshlb.announce.interface import ClusterView
from meshlb.announce.settings import AnnounceSettings, BgpSettings, L2Settings, Neighbor


def settings_from(d: dict) -> AnnounceSettings:
    bgp = dict(d.get("bgp", {}))
    bgp["neighbors"] = tuple(Neighbor(**n) for n in bgp.get("neighbors", ()))
    return AnnounceSettings(mode=d["mode"], bgp=BgpSettings(**bgp), l2=L2Settings(**d.get("l2", {})))


async def main(arg: str) -> None:
    spec = json.loads(arg)
    announcer = make_announcer(settings_from(spec), name=spec["name"], iface=spec.get("iface", ""),
                               router_id=spec.get("router_id", ""), vips=spec.get("vips", ()))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "start":
                await announcer.start()
            elif op == "update":
                view = ClusterView(ready={m: set(v) for m, v in cmd.get("ready", {}).items()},
                                   claims={m: set(v) for m, v in cmd.get("claims", {}).items()})
                await announcer.update(set(cmd["forwardable"]), view)
            elif op == "withdraw_all":
                await announcer.withdraw_all()
            elif op == "stop":
                await announcer.stop(keep=cmd["keep"])
            elif op != "status":
                raise ValueError(f"unknown op {op}")
            reply = {"ok": True, "status": announcer.status(), "owned": sorted(announcer.owned)}
        except Exception as exc:  # the test asserts on it: the interface must not raise
            reply = {"ok": False, "error": repr(exc), "status": announcer.status()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1]))

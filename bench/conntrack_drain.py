#!/usr/bin/env python3
"""Conntrack after load: how fast every mix's conntrack empties once the connections of
a burst have closed, with the periodic idle sweep off (only socket-release events, the
closed-flow map and gossip can empty it, and for handshakes nobody finished, the
handshake timeout).

    sudo python3 bench/conntrack_drain.py [--rounds 5] [--concurrency 500] [--requests 8000] \
        [--modes dr,nat] [--handshake-timeout 10] [--sockops-cgroup auto[,off]] \
        [--json docs/img/conntrack_drain.json]

One netns lab (3 mixes, prefix ``cd<pid>``, ``idle_timeout_s = 0``) per value of
``--sockops-cgroup`` (the agents' ``conntrack.sockops_cgroup``: "off" leaves the
tracepoint alone to report closes), one after the other. Each round runs
``ab -r -c C -n N`` from the client through a VIP, then polls every mix's conntrack count
until all are 0 (or 20 s pass), and reads the agents' counters before and after: tracer
records, the backup program's recoveries, kernel recursion misses, late segments
routed by ct_closed. Markdown on stdout, every round in the JSON. Everything is removed
at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshlb import control  # noqa: E402
from meshlb.lab.lab import VIP_DR, VIP_NAT, Lab, LabOptions  # noqa: E402

VIPS = {"dr": VIP_DR, "nat": VIP_NAT}
POLL_S = 0.05
GIVE_UP_S = 20.0


def call(lab: Lab, node: str, op: str) -> Any:
    return control.call(lab.state["nodes"][node]["control"], op, timeout=10)


def counts(lab: Lab) -> dict[str, int]:
    return {m: call(lab, m, "conntrack_count")["entries"] for m in lab.mixes()}


def agent_counters(lab: Lab) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in lab.mixes():
        s = call(lab, m, "stats")
        for k, v in s["tracer"].items():
            out[f"tracer_{k}"] = out.get(f"tracer_{k}", 0) + v
        out["ct_closed_hit"] = out.get("ct_closed_hit", 0) + s["dataplane"].get("ct_closed_hit", 0)
        for k in ("socket_closed", "received", "applied", "handshake_timeout"):
            out[f"evictions_{k}"] = out.get(f"evictions_{k}", 0) + s["evictions"].get(k, 0)
    return out


def ab(lab: Lab, url: str, c: int, n: int) -> dict[str, Any]:
    p = lab.namespace("client").popen(["ab", "-q", "-r", "-s", "10", "-c", str(c), "-n", str(n), url],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=600)
    res: dict[str, Any] = {}
    for key, pat in (("complete", r"Complete requests:\s+(\d+)"), ("failed", r"Failed requests:\s+(\d+)"),
                     ("rps", r"Requests per second:\s+([\d.]+)")):
        m = re.search(pat, out)
        res[key] = float(m.group(1)) if m else None
    return res


def one_round(lab: Lab, mode: str, c: int, n: int) -> dict[str, Any]:
    for m in lab.mixes():
        call(lab, m, "conntrack_flush")
    before = agent_counters(lab)
    r = ab(lab, f"http://{VIPS[mode]}/", c, n)
    ended = time.monotonic()
    at_end = counts(lab)
    left_1s = None
    took = None
    while time.monotonic() - ended < GIVE_UP_S:
        now = counts(lab)
        t = time.monotonic() - ended
        if left_1s is None and t >= 1.0:
            left_1s = sum(now.values())
        if not any(now.values()):
            took = t
            break
        time.sleep(POLL_S)
    if left_1s is None:
        left_1s = 0
    after = agent_counters(lab)
    return {"mode": mode, "ab": r, "left_at_end": sum(at_end.values()), "left_after_1s": left_1s,
            "left_final": sum(counts(lab).values()), "empty_after_s": took,
            "delta": {k: after.get(k, 0) - before.get(k, 0) for k in after}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--modes", default="dr,nat")
    ap.add_argument("--handshake-timeout", type=float, default=10.0,
                    help="conntrack.handshake_timeout_s of the agents (default: the product's)")
    ap.add_argument("--sockops-cgroup", default="auto",
                    help="comma-separated conntrack.sockops_cgroup values, one lab each")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    settings = [c for c in args.sockops_cgroup.split(",") if c]
    prefix = f"cd{os.getpid() % 100000}"
    rounds: list[dict[str, Any]] = []
    for setting in settings:
        lab = Lab(LabOptions(prefix=prefix, nodes=3, idle_timeout_s=0, health_interval_s=0.5,
                             handshake_timeout_s=args.handshake_timeout, sockops_cgroup=setting))
        try:
            lab.up(wait_s=90)
            for i in range(args.rounds):
                for mode in (modes if i % 2 == 0 else modes[::-1]):
                    r = one_round(lab, mode, args.concurrency, args.requests) | {"sockops_cgroup": setting}
                    print(json.dumps(r), flush=True)
                    rounds.append(r)
        finally:
            problems = Lab.down(prefix)
            if problems:
                print("teardown problems:", problems, file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "kernel": os.uname().release,
                                               "cpus": os.cpu_count(), "rounds": rounds}, indent=1))
    print(f"\n`sudo python3 bench/conntrack_drain.py {' '.join(sys.argv[1:])}`\n")
    print("| sockops_cgroup | mode | rounds | failed requests | left 1 s after ab "
          "| every mix at 0 after, median (max) | handshakes expired | closes via sock_ops "
          "| closes recovered by the backup | recursion misses | late segments via ct_closed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, mode in ((c, m) for c in settings for m in modes):
        rs = [r for r in rounds if r["mode"] == mode and r["sockops_cgroup"] == setting]
        if not rs:
            continue
        took = [r["empty_after_s"] for r in rs if r["empty_after_s"] is not None]
        never = len(rs) - len(took)
        took_s = f"{statistics.median(took):.2f} s ({max(took):.2f} s)" if took else "-"
        if never:
            took_s += f"; {never} round(s) not empty in {GIVE_UP_S:g} s"
        print(f"| {setting} | {mode} | {len(rs)} | {sum(int(r['ab']['failed'] or 0) for r in rs)} | "
              f"{max(r['left_after_1s'] for r in rs)} max | {took_s} | "
              f"{sum(r['delta'].get('evictions_handshake_timeout', 0) for r in rs)} | "
              f"{sum(r['delta'].get('tracer_sockops', 0) for r in rs)} | "
              f"{sum(r['delta'].get('tracer_recovered', 0) for r in rs)} | "
              f"{sum(r['delta'].get('tracer_missed', 0) for r in rs)} | "
              f"{sum(r['delta'].get('ct_closed_hit', 0) for r in rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How much of the gap to one backend reached directly is the balancer, and how much the
second hop of the flows that land on a mix which is not their backend.

    sudo python3 bench/hop_share.py [--nodes 1,2,3] [--passes 2] [--rounds 6] [--duration 5] \
        [--json docs/img/hop_share.json]

For each lab size N (in turn, ``--passes`` times, so that the VM's drift over the run falls
on every N alike) it runs ``bench/lab_bench.py --nodes N`` with keep-alive wrk on three
targets only: the dr VIP, the nat VIP and one backend directly. The router spreads VIP
flows over the N mixes and Maglev over the N backends, so (N-1)/N of the flows cross a
second mix (an `XDP_TX` out of the first mix, the bridge, the backend's veth); with one mix
none does, and "meshlb dr / direct" is the balancer's own cost on the path of a flow it
serves itself.

Ratios are taken per round (same round, same machine noise) and the medians reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import lab_bench  # noqa: E402

TARGETS = ("meshlb dr", "meshlb nat", "direct")


def one_lab(nodes: int, rounds: int, duration: int, conns: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hop-share-") as tmp:
        out = Path(tmp) / "run.json"
        rc = lab_bench.main([
            "--nodes", str(nodes), "--modes", "keepalive", "--rounds", str(rounds),
            "--duration", str(duration), "--conns", str(conns), "--demo-rounds", "0",
            "--joins", "0", "--skip-idle", "--targets", ",".join(TARGETS), "--json", str(out)])
        if rc != 0 or not out.exists():
            raise RuntimeError(f"lab_bench --nodes {nodes} failed (exit {rc})")
        res = json.loads(out.read_text())
    runs = res["comparison"]["runs"]["keepalive"]
    return {name: [r["rps"] for r in runs[name]] for name in TARGETS} | {
        "errors": sum(r["errors"] for name in TARGETS for r in runs[name])}


def summarize(passes: dict[int, list[dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    out = {}
    for nodes, labs in passes.items():
        rps = {name: [x for lab in labs for x in lab[name]] for name in TARGETS}
        ratio = {vip: [a / d for a, d in zip(rps[vip], rps["direct"]) if d] for vip in ("meshlb dr", "meshlb nat")}
        out[nodes] = {
            "second_hop_share": (nodes - 1) / nodes,
            "rps_med": {name: statistics.median(xs) for name, xs in rps.items()},
            "ratio_med": {vip: statistics.median(xs) for vip, xs in ratio.items()},
            "ratio_min": {vip: min(xs) for vip, xs in ratio.items()},
            "ratio_max": {vip: max(xs) for vip, xs in ratio.items()},
            "rounds": len(rps["direct"]),
            "errors": sum(lab["errors"] for lab in labs),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,3", help="lab sizes, comma-separated")
    ap.add_argument("--passes", type=int, default=2, help="times each lab size is built and measured")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--json", default=str(ROOT / "docs" / "img" / "hop_share.json"))
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        ap.error("--nodes takes lab sizes of at least 1")
    if os.geteuid() != 0:
        print("needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    started = time.time()
    passes: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for p in range(args.passes):
        for n in sizes:
            print(f"--- pass {p + 1}, {n} mix(es)", flush=True)
            passes[n].append(one_lab(n, args.rounds, args.duration, args.conns))
    summary = summarize(passes)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "started": started, "cpus": os.cpu_count(),
                                           "kernel": os.uname().release, "passes": passes,
                                           "summary": summary}, indent=1))
    print(f"\nkeep-alive, wrk -t2 -c{args.conns}, {args.passes} labs x {args.rounds} rounds x {args.duration} s "
          "per size; req/s median, ratio per round then median (min-max)\n")
    print("| mixes | flows crossing a second mix | dr req/s | nat req/s | direct req/s "
          "| dr / direct | nat / direct | socket errors |")
    print("|---|---|---|---|---|---|---|---|")
    for n, s in summary.items():
        r = s["rps_med"]
        print(f"| {n} | {s['second_hop_share']:.0%} | {r['meshlb dr']:.0f} | {r['meshlb nat']:.0f} "
              f"| {r['direct']:.0f} | {s['ratio_med']['meshlb dr']:.2f} ({s['ratio_min']['meshlb dr']:.2f}-"
              f"{s['ratio_max']['meshlb dr']:.2f}) | {s['ratio_med']['meshlb nat']:.2f} "
              f"({s['ratio_min']['meshlb nat']:.2f}-{s['ratio_max']['meshlb nat']:.2f}) | {s['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

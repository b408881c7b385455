#!/usr/bin/env python3
"""What the tracer's cgroup sock_ops hook costs under connection-per-request load.

    sudo python3 bench/sockops_cost.py [--passes 2] [--rounds 6] [--duration 5] \
        [--json docs/img/sockops_cost.json]

The hook runs for every TCP socket under the cgroup (the root, in the lab: every socket
of the machine, the direct target's and the client's included), and for the sockets of
watched endpoints once more at each state change. Each pass builds the netns lab twice,
``conntrack.sockops_cgroup = "off"`` then ``"auto"`` (passes alternate which goes first,
so that the VM's drift over the run falls on both alike), and runs
``bench/lab_bench.py --modes close`` on three targets: the dr VIP, the nat VIP and one
backend directly. Ratios VIP / direct are taken per round, so that each compares two
targets measured seconds apart on one lab; the medians of both settings are reported
side by side, with the agents' CPU.
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
SETTINGS = ("off", "auto")


def one_lab(setting: str, rounds: int, duration: int, conns: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sockops-cost-") as tmp:
        out = Path(tmp) / "run.json"
        rc = lab_bench.main([
            "--modes", "close", "--rounds", str(rounds), "--duration", str(duration),
            "--conns", str(conns), "--demo-rounds", "0", "--joins", "0", "--skip-idle",
            "--targets", ",".join(TARGETS), "--sockops-cgroup", setting, "--json", str(out)])
        if rc != 0 or not out.exists():
            raise RuntimeError(f"lab_bench --sockops-cgroup {setting} failed (exit {rc})")
        res = json.loads(out.read_text())
    runs = res["comparison"]["runs"]["close"]
    tracer = {n: s["tracer"] for n, s in res["agent_stats_after_load"].items()}
    return {
        "rps": {name: [r["rps"] for r in runs[name]] for name in TARGETS},
        # mean over the mixes of each VIP run's agent CPU, % of one core
        "agent_cpu_pct": [statistics.mean(r["agent_cpu_pct"].values())
                          for name in TARGETS[:2] for r in runs[name]],
        "errors": sum(r["errors"] for name in TARGETS for r in runs[name]),
        "sockops_closes": sum(t.get("sockops", 0) for t in tracer.values()),
    }


def summarize(labs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for setting, passes in labs.items():
        rps = {name: [x for p in passes for x in p["rps"][name]] for name in TARGETS}
        ratio = {vip: [a / d for a, d in zip(rps[vip], rps["direct"]) if d] for vip in TARGETS[:2]}
        out[setting] = {
            "rps_med": {name: statistics.median(xs) for name, xs in rps.items()},
            "ratio_to_direct_med": {vip: statistics.median(xs) for vip, xs in ratio.items()},
            "ratio_to_direct_min": {vip: min(xs) for vip, xs in ratio.items()},
            "ratio_to_direct_max": {vip: max(xs) for vip, xs in ratio.items()},
            "agent_cpu_pct_med": statistics.median(x for p in passes for x in p["agent_cpu_pct"]),
            "rounds": len(rps["direct"]),
            "errors": sum(p["errors"] for p in passes),
            "sockops_closes": sum(p["sockops_closes"] for p in passes),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=2, help="times each setting's lab is built and measured")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--json", default=str(ROOT / "docs" / "img" / "sockops_cost.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    labs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    started = time.time()
    for p in range(args.passes):
        for setting in (SETTINGS if p % 2 == 0 else SETTINGS[::-1]):
            print(f"--- pass {p + 1}: sockops_cgroup = {setting}", flush=True)
            labs[setting].append(one_lab(setting, args.rounds, args.duration, args.conns))
    summary = summarize(labs)
    Path(args.json).write_text(json.dumps({
        "args": vars(args), "started": started, "kernel": os.uname().release, "cpus": os.cpu_count(),
        "labs": labs, "summary": summary}, indent=1))
    print(f"\n`sudo python3 bench/sockops_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| sockops_cgroup | rounds | dr req/s | nat req/s | direct req/s | dr / direct | nat / direct "
          "| agent CPU (% of a core) | closes via sock_ops | socket errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        s = summary[setting]
        r, lo, hi = s["ratio_to_direct_med"], s["ratio_to_direct_min"], s["ratio_to_direct_max"]
        print(f"| {setting} | {s['rounds']} | {s['rps_med']['meshlb dr']:.0f} | {s['rps_med']['meshlb nat']:.0f} | "
              f"{s['rps_med']['direct']:.0f} | "
              f"{r['meshlb dr']:.2f}x ({lo['meshlb dr']:.2f}-{hi['meshlb dr']:.2f}) | "
              f"{r['meshlb nat']:.2f}x ({lo['meshlb nat']:.2f}-{hi['meshlb nat']:.2f}) | "
              f"{s['agent_cpu_pct_med']:.1f} | {s['sockops_closes']} | {s['errors']} |")
    on, off = summary["auto"]["ratio_to_direct_med"], summary["off"]["ratio_to_direct_med"]
    print(f"\nwith the hook / without, of the ratios to direct: dr {on['meshlb dr'] / off['meshlb dr']:.2f}, "
          f"nat {on['meshlb nat'] / off['meshlb nat']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

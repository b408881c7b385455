"""Run the reliability scenarios and write docs/reliability.md from their figures.

    python3 bench/reliability_report.py                      # CI-sized run, prints the table
    python3 bench/reliability_report.py --scale 4 --fuzz-execs 200000 --write docs/reliability.md
    python3 bench/reliability_report.py --from figures.jsonl --write docs/reliability.md

Each test under tests/reliability/ prints its figures and, with MESHLB_RELIABILITY_OUT
set, appends them as JSON lines; this script sets it, runs pytest, and turns the lines
into one table, scenario by scenario. ``--scale`` multiplies the load's connections,
``--fuzz-execs`` the fuzzers' executions. Needs root (the netns lab).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(scale: int, fuzz_execs: int, out: str, select: str | None) -> tuple[str, list[str]]:
    env = dict(os.environ, MESHLB_RELIABILITY_OUT=out, MESHLB_RELIABILITY_SCALE=str(scale),
               MESHLB_FUZZ_EXECS=str(fuzz_execs), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/reliability"]
    if select:
        cmd += ["-k", select]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    # the whole pytest output next to the figures, to read a failure's reason
    with open(out + ".log", "w") as f:
        f.write(proc.stdout + proc.stderr)
    print(f"pytest output: {out}.log", file=sys.stderr)
    lines = proc.stdout.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed)", ln)), "(no summary)")
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith("FAILED ")]
    return summary.strip("= "), failed


def _fmt_s(v: Any) -> str:
    return "-" if v is None else f"{v:g} s"


def _row(r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """(scenario, load held, tried, lost, figures)"""
    s = r["scenario"]
    kind, _, name = s.partition(": ")
    if kind == "fault":
        wrk = r.get("wrk") or {}
        wrk_err = sum(wrk.get(k, 0) for k in ("connect", "read", "write", "timeout", "non2xx"))
        load = f"{r['requests']} probe requests, " + (
            "wrk hung after its duration (killed, no figures)" if wrk.get("hung_killed")
            else f"{wrk.get('requests', 0)} wrk requests")
        lost = f"{r['failed_off_failed_node']} failed off the failed node"
        if r.get("failed_on_failed_node"):
            lost += f"; {r['failed_on_failed_node']} on it"
        if r.get("new_flow_failures"):
            lost += f"; {r['new_flow_failures']} new flows failed"
        if wrk_err:
            lost += f"; wrk errors {wrk_err}"
        left = r.get("conntrack_left", 0)
        by = r.get("conntrack_left_by_backend") or {}
        figs = [f"new flows avoid: {_fmt_s(r.get('new_flows_avoid_s'))}",
                f"digest equal: {_fmt_s(r.get('digest_equal_s'))}",
                f"conntrack left: {left}" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(by.items()))})" if by else ""),
                f"agent RSS max: {max((r.get('agent_rss_kb') or {0: 0}).values()) // 1024} MiB"]
        for k in ("declared_dead_s", "survivors_agree_s", "majority_agrees_s", "rejoin_digest_equal_s",
                  "back_in_tables_s", "missed_evictions_repaired_s", "restart_loop_s"):
            if r.get(k):
                figs.append(f"{k.replace('_s', '').replace('_', ' ')}: {r[k]:g} s")
        for k in ("suspicions", "deaths", "gossip_dropped", "peak_entries", "ct_insert_fail", "flood_flows"):
            if k in r:
                figs.append(f"{k.replace('_', ' ')}: {r[k]}")
        return name, load, "1 fault", lost, "; ".join(figs)
    if kind == "gossip":
        if "counted" in r:
            return name, "-", f"{r['sent']} datagrams", "no state change", \
                "counted: " + ", ".join(f"{k} {v}" for k, v in sorted(r["counted"].items()))
        extra = {k: v for k, v in r.items() if k != "scenario"}
        if "requests" in extra:
            return name, f"{extra['requests']} probe requests", "all of the above", f"{extra['failed']} failed", \
                f"backends {', '.join(extra['backends'])}"
        return name, "probe load", json.dumps({k: v for k, v in extra.items() if k in ("flows", "datagrams")}), \
            "no flow broken", json.dumps({k: v for k, v in extra.items() if k not in ("flows", "datagrams")})
    if kind == "packets":
        if "counted" in r:
            return name, "-", f"{r['sent']} frames", f"{r['reached_other_backends']} reached another mix", \
                "counted: " + ", ".join(f"{k} {v}" for k, v in sorted(r["counted"].items()))
        extra = {k: v for k, v in r.items() if k not in ("scenario", "sent")}
        return name, "-", f"{r['sent']} frames", "-", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in extra.items())
    if kind == "config":
        return name, "-", "1 file", "refused" if r.get("refused") else "ACCEPTED", f"`{r.get('message', '')}`"
    if kind in ("access", "fuzz"):
        extra = {k: v for k, v in r.items() if k != "scenario"}
        return name, "-", "-", "-", ", ".join(f"{k} {v}" for k, v in extra.items())
    return s, "-", "-", "-", json.dumps(r)


HEADER = """# Reliability and security

What meshlb survives, what it refuses, and what is lost (goal: nothing). Every row is
a pytest test under `tests/reliability/` that CI runs (`@pytest.mark.privileged`,
lab scenarios also `slow`); the figures are what those tests measured, collected and
written here by `bench/reliability_report.py`.

How the lab is used: three mixes and a client in network namespaces (`meshlb lab`),
real agents, XDP in native mode on veth, the demo application on every mix. Load is
the test's probe (persistent keep-alive connections, one request per connection
every 0.1 s, plus a new connection every 0.1 s, each outcome recorded) and `wrk`
running alongside, both from the client to the DR VIP. The lab turns the conntrack
idle sweep off (`idle_timeout_s = 0`) so that only socket-close evictions can empty
the maps, which is what "conntrack left" measures. The client reaches the mixes
through the lab's router (ECMP hashed on every packet's 5-tuple). For a crash and a
link down the test plays the router's own failure detection: it withdraws the failed
mix's next hop from the router's ECMP route at the moment of the fault (as BFD or a
BGP hold timer would) and restores it when the mix is back.

"Failed off the failed node" counts failed requests on connections that were open
at the fault and involved no failed mix: neither their backend nor (for a freeze,
a partition) the mix the router sent them to. Goal: 0.
"""


NOTES_MARKER = "<!-- notes: kept by bench/reliability_report.py -->"


def render(rows: list[dict[str, Any]], command: str, summary: str, failed: list[str]) -> str:
    out = [HEADER]
    out.append(f"Produced by `{command}` on {datetime.date.today().isoformat()} "
               f"({platform.system()} {platform.release()}, {os.cpu_count()} CPUs, shared with other work).\n")
    out.append(f"pytest: {summary}\n")
    out.append("| scenario | load held | tried | lost | figures |")
    out.append("|---|---|---|---|---|")
    order = {"fault": 0, "gossip": 1, "packets": 2, "config": 3, "access": 4, "fuzz": 5}
    seen = set()
    for r in sorted(rows, key=lambda r: order.get(r["scenario"].split(":")[0], 9)):
        key = json.dumps(r, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        cells = [c.replace("|", "\\|") for c in _row(r)]
        kind = r["scenario"].split(":")[0]
        out.append(f"| {kind}: {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {cells[4]} |")
    out.append("")
    if failed:
        out.append("## Goals not met (failing tests)\n")
        out += [f"- `{f}`" for f in failed]
        out.append("")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--fuzz-execs", type=int, default=20000)
    ap.add_argument("-k", dest="select", help="pytest -k expression (a subset of scenarios)")
    ap.add_argument("--from", dest="src", help="render from this JSON-lines file instead of running")
    ap.add_argument("--summary", default="", help="with --from: the pytest summary line to show")
    ap.add_argument("--failed", default="", help="with --from: failing test ids, comma separated")
    ap.add_argument("--command", default="", help="with --from: the command that produced the figures")
    ap.add_argument("--write", metavar="FILE", help="write the Markdown here (else stdout)")
    args = ap.parse_args()
    if args.src:
        path, summary = args.src, args.summary or "(not recorded)"
        failed = [f for f in args.failed.split(",") if f]
        command = args.command or f"python3 bench/reliability_report.py --from {args.src}"
    else:
        fd, path = tempfile.mkstemp(prefix="meshlb-reliability-", suffix=".jsonl")
        os.close(fd)
        summary, failed = run(args.scale, args.fuzz_execs, path, args.select)
        command = " ".join(["python3 bench/reliability_report.py"] + sys.argv[1:])
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    text = render(rows, command, summary, failed)
    if args.write and os.path.exists(args.write):
        # the hand-written part (findings, limits) below the marker survives a re-run
        with open(args.write) as f:
            old = f.read()
        if NOTES_MARKER in old:
            text += "\n" + old[old.index(NOTES_MARKER):]
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
        print(f"wrote {args.write} ({len(rows)} figures; pytest: {summary})")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

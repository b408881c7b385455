"""`meshlb top`: packets and bytes per second per VIP and per backend, and packets per
second per data-plane verdict and reason, every interval.

Like `ipvsadm --rate` under `watch`: on a terminal the screen is redrawn in place;
into a pipe each interval is a block of its own, or with ``--format json`` one JSON
object per line. Rates are differences of the agent's counters between two samples
over the time between them; a counter that went down (the agent restarted without
its pinned state) counts from zero.

The counters come from the control socket: ``vips`` (per VIP) and ``stats``
(``dataplane`` per reason, ``backends`` per backend). An agent whose ``stats`` has no
``backends`` gets them read from its metrics endpoint (``--metrics``, the
``meshlb_backend_*_total`` series).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, TextIO

from meshlb.agent_cli import CONTROL_DIR, _call, _table
from meshlb.cli import CliError

DEFAULT_METRICS = "127.0.0.1:9477"  # node.metrics' default
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


@dataclass
class Sample:
    """Cumulative counters at one moment (``at`` on the monotonic clock)."""

    at: float
    node: str = ""
    vips: dict[str, tuple[int, int]] = field(default_factory=dict)  # vip -> (packets, bytes)
    backends: dict[str, tuple[int, int]] | None = None  # None: not available
    reasons: dict[str, int] = field(default_factory=dict)
    backends_note: str = ""


def _delta(now: int, before: int) -> int:
    return now - before if now >= before else now


def rates(prev: Sample, cur: Sample, wall: float | None = None) -> dict[str, Any]:
    """Per-second rates between two samples, as the JSON object one interval prints."""
    dt = max(cur.at - prev.at, 1e-9)

    def pair_rates(now: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> dict[str, Any]:
        out = {}
        for key, (p, b) in sorted(now.items()):
            p0, b0 = before.get(key, (p, b))  # new since the last sample: no rate yet
            out[key] = {"packets_per_s": round(_delta(p, p0) / dt, 3), "bytes_per_s": round(_delta(b, b0) / dt, 3)}
        return out

    result: dict[str, Any] = {
        "time": round(time.time() if wall is None else wall, 3),
        "interval_s": round(dt, 3),
        "node": cur.node,
        "vips": pair_rates(cur.vips, prev.vips),
        "backends": (pair_rates(cur.backends, prev.backends or {}) if cur.backends is not None else None),
        "reasons": {r: round(_delta(n, prev.reasons.get(r, n)) / dt, 3) for r, n in sorted(cur.reasons.items())},
    }
    return result


def render(r: dict[str, Any], note: str = "") -> str:
    """One interval as text: a table per scope, reasons with packets in the interval."""
    stamp = time.strftime("%H:%M:%S", time.localtime(r["time"]))
    out = [f"meshlb top: {r['node']}  every {r['interval_s']:g}s  {stamp}", ""]

    def rows(d: dict[str, Any]) -> list[list[str]]:
        return [[k, f"{v['packets_per_s']:.1f}", f"{v['bytes_per_s']:.0f}"] for k, v in d.items()]

    out.append(_table(rows(r["vips"]), ["VIP", "PKT/S", "BYTES/S"]) if r["vips"] else "VIP: none")
    out.append("")
    if r["backends"] is None:
        out.append(f"BACKEND: per-backend counters not available{': ' + note if note else ''}")
    elif r["backends"]:
        out.append(_table(rows(r["backends"]), ["BACKEND", "PKT/S", "BYTES/S"]))
    else:
        out.append("BACKEND: none")
    out.append("")
    busy = [[reason, f"{v:.1f}"] for reason, v in r["reasons"].items() if v > 0]
    out.append(_table(busy, ["REASON", "PKT/S"]) if busy else "REASON: no packets in this interval")
    return "\n".join(out)


# --- sampling -------------------------------------------------------------------------


def parse_backend_metrics(text: str) -> dict[str, tuple[int, int]]:
    """meshlb_backend_{packets,bytes}_total from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    pkts: dict[str, int] = {}
    byts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "meshlb_backend_packets_total":
                pkts[s.labels["backend"]] = int(s.value)
            elif s.name == "meshlb_backend_bytes_total":
                byts[s.labels["backend"]] = int(s.value)
    return {k: (pkts[k], byts.get(k, 0)) for k in pkts}


def scrape_backends(address: str, timeout: float = 2.0) -> dict[str, tuple[int, int]]:
    url = address if "://" in address else f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (an operator-given URL)
        return parse_backend_metrics(resp.read().decode())


def take_sample(args: argparse.Namespace) -> Sample:
    vips = _call(args, "vips")
    stats = _call(args, "stats")
    at = time.monotonic()
    s = Sample(at=at, node=stats.get("node", ""),
               vips={v["vip"]: (int(v["packets"]), int(v["bytes"])) for v in vips["vips"]},
               reasons={k: int(v) for k, v in stats.get("dataplane", {}).items()})
    if isinstance(stats.get("backends"), dict):
        s.backends = {k: (int(v["packets"]), int(v["bytes"])) for k, v in stats["backends"].items()}
    elif args.metrics:
        try:
            s.backends = scrape_backends(args.metrics)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            s.backends_note = f"the agent's stats have none and {args.metrics} did not answer ({exc})"
    return s


def cmd_top(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.interval <= 0:
        raise CliError("--interval must be above 0")
    in_place = args.format == "table" and out.isatty()
    prev = take_sample(args)
    deadline = prev.at
    shown = 0
    try:
        while args.count is None or shown < args.count:
            deadline += args.interval
            time.sleep(max(0.0, deadline - time.monotonic()))
            cur = take_sample(args)
            r = rates(prev, cur)
            if args.format == "json":
                out.write(json.dumps(r, sort_keys=True) + "\n")
            else:
                text = render(r, cur.backends_note)
                out.write(CLEAR + text + "\n" if in_place else ("\n" if shown else "") + text + "\n")
            out.flush()
            prev = cur
            shown += 1
    except KeyboardInterrupt:
        pass  # the usual way to leave a top: not an error
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="packets and bytes per second per VIP, backend and verdict reason, refreshed")
    p.add_argument("--control", metavar="PATH",
                   help=f"agent control socket (default: $MESHLB_CONTROL, else the only socket in {CONTROL_DIR})")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (redrawn in place on a terminal) or json (one object per interval and line)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between updates (default 1)")
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N updates (default: until Ctrl-C)")
    p.add_argument("--metrics", default=DEFAULT_METRICS, metavar="HOST:PORT",
                   help="the agent's metrics endpoint, read for per-backend counters when its stats lack them "
                        f"(default {DEFAULT_METRICS}; '' to skip)")
    p.set_defaults(func=cmd_top)

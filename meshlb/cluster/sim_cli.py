"""``meshlb sim``: run the cluster protocol in the deterministic simulator.

Example::

    meshlb sim --nodes 100 --loss 5% --crash 1 --seed 1 --format json

prints one JSON object. The same arguments (seed included) print the same object,
except for the wall-clock keys ``cpu_s_per_member_per_s``, ``cpu_s_total`` and
``wall_s`` (leave them out with ``--no-timing`` to get byte-identical output).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from collections.abc import Callable
from typing import Any, NoReturn

from meshlb.cluster.simnet import parse_fraction, parse_partition

KEYS_HELP = """\
output keys (JSON, stable; times in seconds of simulated time):
  inputs          nodes seed duration preset loss duplicate latency_ms jitter_ms crash
                  restart leave starved starve_pause_s multicast evictions partitions
  crash->detect   suspect_p50_s suspect_p99_s dead_p50_s dead_p99_s  (over all
                  (live observer, crashed member) pairs), suspect_all_max_s
                  dead_all_p50_s dead_all_max_s (until the LAST live member saw it),
                  suspect_missed dead_missed detect_pairs
  mistakes        false_suspicions false_deaths (running members wrongly suspected /
                  declared dead, once per member and incarnation), false_suspicion_events
                  false_death_events (per reporting member), false_examples; a
                  partition's doing is counted apart: partition_suspicions partition_deaths
  evictions       evictions_published eviction_pairs eviction_p50_s eviction_p99_s
                  eviction_max_s eviction_missed  (over (eviction, live member) pairs)
  cost            idle_bytes_per_s_per_member idle_datagrams_per_s_per_member
                  idle_window_s datagrams_sent bytes_sent cpu_s_per_member_per_s
                  cpu_s_total wall_s
  convergence     converged converged_at_s live_members
  drops           drops.net (loss, partition, member_down, ...), drops.wire (by reason)
a percentile with no samples is null.
"""


def _one_line_error(self: argparse.ArgumentParser, message: str) -> NoReturn:
    # one line the user can act on; the usage is one --help away
    self.exit(2, f"meshlb sim: {message} (see meshlb sim --help)\n")


def _fraction(what: str) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            return parse_fraction(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    conv.__name__ = what
    return conv


def _int_at_least(lo: int, what: str) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be at least {lo}, got {v}")
        return v

    conv.__name__ = what
    return conv


def _seconds(what: str, positive: bool = True) -> Callable[[str], float]:
    def conv(text: str) -> float:
        s = text.strip()
        scale = 1.0
        if s.endswith("ms"):
            s, scale = s[:-2], 0.001
        elif s.endswith("s"):
            s = s[:-1]
        try:
            v = float(s) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number of seconds (or '5ms'), got {text!r}") from None
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise argparse.ArgumentTypeError(f"{what} must be {'positive' if positive else 'non-negative'}, got {text!r}")
        return v

    conv.__name__ = what
    return conv


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sim",
        help="simulate a cluster (real protocol, simulated network and clock)",
        description="Run N members of the real cluster protocol (Node + Wire, real encryption) on a "
                    "simulated network and virtual clock; print one JSON object of measurements. "
                    "Same arguments, same output.",
        epilog=KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.error = types.MethodType(_one_line_error, p)  # type: ignore[method-assign]
    # argparse hands a subcommand's unknown options up to the top-level parser, whose
    # error prints the usage too; refusing them here keeps every mistake to one line
    known = p.parse_known_args

    def strict(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extra = known(args, namespace)
        if extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns, []

    p.parse_known_args = strict  # type: ignore[method-assign,assignment]
    p.add_argument("--nodes", "-n", type=_int_at_least(2, "--nodes"), default=100, help="members (default 100)")
    p.add_argument("--loss", type=_fraction("--loss"), default=0.0,
                   help="datagram loss: a fraction (0.05) or a percentage (5%%); default 0")
    p.add_argument("--crash", type=_int_at_least(0, "--crash"), default=0, help="members that crash (default 0)")
    p.add_argument("--seed", type=_int_at_least(0, "--seed"), default=1, help="run seed (default 1)")
    p.add_argument("--duration", type=_seconds("--duration"), default=60.0,
                   help="simulated seconds (default 60)")
    p.add_argument("--starved", type=_fraction("--starved"), default=0.0,
                   help="fraction of members that are descheduled now and then (default 0)")
    p.add_argument("--starve-pause", type=_seconds("--starve-pause"), default=1.0,
                   help="longest pause of a starved member, seconds (default 1)")
    p.add_argument("--starve-duty", type=_fraction("--starve-duty"), default=0.3,
                   help="share of time a starved member is paused (default 0.3)")
    p.add_argument("--partition", action="append", default=[], metavar="GROUPS@START-END",
                   help="e.g. 0-49|50-99@10-30 or 50%%@10-30 (first half against the rest); repeatable")
    p.add_argument("--multicast", action="store_true", help="members also reach each other through the group")
    p.add_argument("--preset", choices=("lan", "wan", "local"), default="lan",
                   help="protocol preset and matching network latency (default lan)")
    p.add_argument("--evictions", type=_int_at_least(0, "--evictions"), default=0,
                   help="conntrack evictions published at random members and times (default 0)")
    p.add_argument("--restart", type=_int_at_least(0, "--restart"), default=0,
                   help="of the crashed members, how many restart (default 0)")
    p.add_argument("--restart-after", type=_seconds("--restart-after"), default=20.0,
                   help="seconds from crash to restart (default 20)")
    p.add_argument("--leave", type=_int_at_least(0, "--leave"), default=0, help="members that leave gracefully")
    p.add_argument("--duplicate", type=_fraction("--duplicate"), default=0.0, help="datagram duplication rate")
    p.add_argument("--latency", type=_seconds("--latency", positive=False), default=None,
                   help="one-way latency, seconds or '0.5ms' (default: the preset's)")
    p.add_argument("--jitter", type=_seconds("--jitter", positive=False), default=None,
                   help="mean exponential jitter (default: the preset's)")
    p.add_argument("--idle-window", metavar="FROM-TO", default=None,
                   help="seconds in which idle traffic is measured; crashes, leaves and evictions come "
                        "after it (default: 25%%-40%% of the duration)")
    p.add_argument("--format", choices=("json", "table"), default="json")
    p.add_argument("--no-timing", action="store_true",
                   help="omit the wall-clock keys so the output depends on the arguments only")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from meshlb.cluster.sim import SimConfig

    partitions = tuple(parse_partition(s, args.nodes) for s in args.partition)
    idle = None
    if args.idle_window is not None:
        try:
            a, b = (float(x) for x in args.idle_window.split("-", 1))
        except ValueError:
            raise ValueError(f"--idle-window must be FROM-TO in seconds, e.g. 60-240, got {args.idle_window!r}") from None
        idle = (a, b)
    cfg = SimConfig(
        nodes=args.nodes, seed=args.seed, duration=args.duration, preset=args.preset,
        loss=args.loss, duplicate=args.duplicate, latency_s=args.latency, jitter_s=args.jitter,
        crash=args.crash, restart=args.restart, restart_after_s=args.restart_after, leave=args.leave,
        starved=args.starved, starve_pause_s=args.starve_pause, starve_duty=args.starve_duty,
        multicast=args.multicast, partitions=partitions, evictions=args.evictions, idle_window_s=idle,
    )
    cfg.validate()
    return cfg


def format_table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    for k, v in report.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                inner = ", ".join(f"{a}={b}" for a, b in v2.items()) if isinstance(v2, dict) else str(v2)
                rows.append((f"{k}.{k2}", inner or "-"))
        else:
            rows.append((k, "-" if v is None else json.dumps(v) if isinstance(v, (list, bool)) else str(v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"meshlb sim: {exc}", file=sys.stderr)
        return 2
    from meshlb.cluster.sim import Sim

    try:
        report = Sim(cfg).run().report(timing=not args.no_timing)
    except ImportError as exc:
        print(f"meshlb sim: the cluster protocol does not import: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0

"""CLI commands that start the agent or talk to a running one over its control socket.

``--format json`` output is stable: the keys documented in docs/operations.md are
only ever added to, never renamed or removed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from meshlb import control
from meshlb.cli import CliError

log = logging.getLogger("meshlb.cli")

CONTROL_DIR = "/run/meshlb"
DEFAULT_CONTROL = f"{CONTROL_DIR}/<name>.sock"


def _control_path(args: argparse.Namespace) -> str:
    """--control, else $MESHLB_CONTROL, else the only agent socket in /run/meshlb."""
    path = args.control or os.environ.get("MESHLB_CONTROL")
    if path:
        return path
    try:
        socks = sorted(e for e in os.listdir(CONTROL_DIR) if e.endswith(".sock"))
    except FileNotFoundError:
        socks = []
    except PermissionError:
        raise CliError(f"permission denied on {CONTROL_DIR} (the control socket is root only)") from None
    if len(socks) == 1:
        return os.path.join(CONTROL_DIR, socks[0])
    if not socks:
        raise CliError(f"agent not running (no control socket in {CONTROL_DIR}; pass --control PATH)")
    raise CliError(f"several agents in {CONTROL_DIR} ({', '.join(socks)}): pass --control PATH")


def _call(args: argparse.Namespace, op: str, **kwargs: Any) -> Any:
    try:
        return control.call(_control_path(args), op, kwargs)
    except control.ControlError as exc:
        raise CliError(str(exc)) from None


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


# --- join ---------------------------------------------------------------------------


def cmd_join(args: argparse.Namespace) -> int:
    from meshlb import preflight  # noqa: PLC0415  (keeps `members` fast)

    try:
        # privileges first: a user without them learns that before anything about the file
        preflight.check_privileges()
    except preflight.StartError as exc:
        raise CliError(str(exc)) from None
    from meshlb import config as config_mod  # noqa: PLC0415
    from meshlb.agent import run_agent  # noqa: PLC0415
    from meshlb.dataplane.libbpf import BpfError  # noqa: PLC0415

    try:
        cfg = config_mod.load(args.config) if args.config else config_mod.default_config()
        peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else None
        cfg = config_mod.merge_cli(
            cfg, peers=peers, iface=args.iface, name=args.name, bind=args.bind, control=args.control
        )
        keys = config_mod.validate_host(cfg)
        preflight.check_host()
    except (config_mod.ConfigError, preflight.StartError) as exc:
        raise CliError(str(exc)) from None
    try:
        return run_agent(cfg, keys, config_path=args.config)
    except BpfError as exc:
        log.debug("the agent failed to start", exc_info=True)
        raise CliError(preflight.explain(exc)) from None
    except RuntimeError as exc:
        # the agent's own start failures (cannot attach XDP, mount bpffs, ...) carry
        # their one line; the traceback is for log_level = "debug"
        log.debug("the agent failed", exc_info=True)
        raise CliError(str(exc)) from None


# --- members ------------------------------------------------------------------------


def members_rows(result: dict[str, Any]) -> tuple[list[list[str]], str]:
    now = result.get("now", time.time())
    members = result["members"]
    alive_digests = {m["table_digest"] for m in members if m["status"] == "alive"}
    rows = []
    for m in members:
        health = m["health"]
        if m.get("drained") and health == "ok":
            health = "draining"
        vips = ",".join(m["vips"]) or ("(balancer only)" if m.get("serves") is False else "-")
        rows.append(
            [
                m["name"] + (" *" if m.get("self") else ""),
                m["address"],
                m["status"],
                str(m["incarnation"]),
                vips,
                health,
                str(m.get("flows", "-")),
                (m["table_digest"] or "-")[:12],
                _ago(now - m["status_since"]),
            ]
        )
    if len(alive_digests) == 1:
        digest = next(iter(alive_digests)) or "-"
        summary = f"tables: all {sum(m['status'] == 'alive' for m in members)} alive members agree ({digest[:12]})"
    else:
        summary = f"tables: alive members DISAGREE ({len(alive_digests)} different digests)"
    return rows, summary


def server_rows(result: dict[str, Any]) -> list[list[str]]:
    return [[s["name"], ",".join(s["vips"]), "draining" if s["drained"] and s["health"] == "ok" else s["health"],
             str(s["flows"])] for s in result.get("servers", ())]


def cmd_members(args: argparse.Namespace) -> int:
    result = _call(args, "members")
    if args.format == "json":
        _print_json(result)
        return 0
    rows, summary = members_rows(result)
    print(_table(rows, ["NAME", "ADDRESS", "STATUS", "INC", "VIPS", "HEALTH", "FLOWS", "DIGEST", "CHANGED"]))
    servers = server_rows(result)
    if servers:
        print()
        print(_table(servers, ["SERVER", "VIPS", "HEALTH", "FLOWS"]))
    print(summary)
    return 0


# --- leave / stats / vips / conntrack -------------------------------------------------


def cmd_leave(args: argparse.Namespace) -> int:
    result = _call(args, "leave")
    if args.format == "json":
        _print_json(result)
    else:
        print(f"leaving: draining for up to {result['drain_timeout_s']:g} s, then the agent exits")
    return 0


def tree_lines(value: Any, indent: str = "") -> list[str]:
    """Nested JSON values as indented ``key: value`` lines (mappings sorted by key, list
    items as ``- item``), the way the table format shows every nested result."""
    lines: list[str] = []
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        for k, v in items:
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{indent}{k}:")
                lines.extend(tree_lines(v, indent + "  "))
            else:
                lines.append(f"{indent}{k}: {_scalar(v)}")
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)) and v:
                sub = tree_lines(v, indent + "  ")
                lines.append(f"{indent}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{indent}- {_scalar(v)}")
    else:
        lines.append(f"{indent}{_scalar(value)}")
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "-"
    if isinstance(v, (dict, list)):
        return "(none)"  # empty
    return str(v)


def cmd_stats(args: argparse.Namespace) -> int:
    result = _call(args, "stats")
    if args.format == "json":
        _print_json(result)
        return 0
    for line in tree_lines(result):
        print(line)
    return 0


def backend_cell(v: dict[str, Any]) -> str:
    """A VIP's backends in one cell: names, with what is not plain (a weight other than
    1, a state other than active, a draining backend's flows here) in brackets."""
    if "backend_set" not in v:  # an agent of a version without it
        return ",".join(v["backends"]) or "-"
    out = []
    for b in v["backend_set"]:
        notes = []
        if b["weight"] != 1:
            notes.append(f"w{b['weight']}")
        if b["state"] != "active":
            notes.append(b["state"] if b["state"] != "draining" else f"draining, {b['flows']} flows")
        elif b["health"] != "ok":
            notes.append(b["health"])
        out.append(b["name"] + (f" [{', '.join(notes)}]" if notes else ""))
    return ", ".join(out) or "-"


def cmd_vips(args: argparse.Namespace) -> int:
    result = _call(args, "vips")
    if args.format == "json":
        _print_json(result)
        return 0
    rows = [
        [v["vip"], v["mode"], str(len(v["backends"])), backend_cell(v), v["table_digest"][:12],
         str(v["packets"]), str(v["bytes"])]
        for v in result["vips"]
    ]
    print(_table(rows, ["VIP", "MODE", "N", "BACKENDS", "DIGEST", "PACKETS", "BYTES"]))
    return 0


def cmd_backend(args: argparse.Namespace) -> int:
    if args.action == "list":
        result = _call(args, "backends")
        if args.format == "json":
            _print_json(result)
            return 0
        now = time.time()
        rows = [[e["key"], "drained" if e["drained"] else "undrained", _ago(now - e["since"]), e["origin"]]
                for e in result["drains"]]
        if rows:
            print(_table(rows, ["BACKEND", "STATE", "SINCE", "BY"]))
        else:
            print("no backend has been drained")
        return 0
    if not args.name:
        raise CliError(f"{args.action}: name a member or a server address (meshlb backend {args.action} NAME|ADDRESS)")
    try:
        result = control.call(_control_path(args), f"backend_{args.action}", {"name": args.name})
    except control.ControlError as exc:
        print(f"meshlb backend {args.action}: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        _print_json(result)
    else:
        what = "drained" if result["drained"] else "undrained"
        again = " (it was already)" if result["was_drained"] == result["drained"] else ""
        print(f"{result['key']} {what} cluster-wide{again}")
    return 0


def cmd_conntrack(args: argparse.Namespace) -> int:
    if args.action == "count":
        result = _call(args, "conntrack_count")
        if args.format == "json":
            _print_json(result)
        else:
            print(result["entries"])
        return 0
    if args.action == "flush":
        result = _call(args, "conntrack_flush")
        if args.format == "json":
            _print_json(result)
        else:
            print(f"flushed {result['deleted']} entries")
        return 0
    result = _call(args, "conntrack_list", limit=args.limit)
    if args.format == "json":
        _print_json(result)
        return 0
    rows = [[e["client"], e["vip"], e["proto"], e["backend"], e["state"], f"{e['idle_s']:.1f}s"]
            for e in result["entries"]]
    print(_table(rows, ["CLIENT", "VIP", "PROTO", "BACKEND", "STATE", "IDLE"]))
    if result.get("truncated"):
        print(f"(first {len(rows)} of {result['total']})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, fmt: bool = True) -> None:
        p.add_argument("--control", metavar="PATH",
                       help=f"agent control socket (default: $MESHLB_CONTROL, else the only socket in {CONTROL_DIR})")
        if fmt:
            p.add_argument("--format", choices=("table", "json"), default="table", help="output format (json is stable)")

    p = sub.add_parser("join", help="run the agent on this host and join the cluster")
    p.add_argument("--config", metavar="FILE", help="cluster file (TOML); see cluster.toml.example")
    p.add_argument("--peers", metavar="HOST[:PORT],...", help="seed members to join through (comma separated)")
    p.add_argument("--iface", metavar="IFACE", help="interface the XDP balancer attaches to")
    p.add_argument("--name", metavar="NAME", help="member name (default: hostname)")
    p.add_argument("--bind", metavar="ADDR[:PORT]", help="gossip listen address")
    p.add_argument("--control", metavar="PATH", help=f"control socket to serve (default {DEFAULT_CONTROL})")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("members", help="list cluster members as this node sees them")
    common(p)
    p.set_defaults(func=cmd_members)

    p = sub.add_parser("leave", help="drain and leave the cluster gracefully (the agent exits)")
    common(p)
    p.set_defaults(func=cmd_leave)

    p = sub.add_parser("stats", help="data-plane and gossip counters")
    common(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("vips", help="VIPs, their backends and table digests")
    common(p)
    p.set_defaults(func=cmd_vips)

    p = sub.add_parser("backend", help="drain a backend cluster-wide (no new flows, established ones finish), "
                                       "undrain it, or list the drain map")
    p.add_argument("action", choices=("drain", "undrain", "list"))
    p.add_argument("name", nargs="?", help="a member name or a server's address")
    common(p)
    p.set_defaults(func=cmd_backend)

    p = sub.add_parser("conntrack", help="inspect or flush the conntrack map")
    p.add_argument("action", choices=("list", "count", "flush"))
    p.add_argument("--limit", type=int, default=1000, help="list at most this many entries")
    common(p)
    p.set_defaults(func=cmd_conntrack)

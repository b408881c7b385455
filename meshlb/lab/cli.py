"""`meshlb lab`: a cluster of network namespaces on this host (see meshlb/lab/lab.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from meshlb.cli import CliError


def _lab():
    from meshlb.lab import lab  # noqa: PLC0415  (pyroute2 import only when used)

    return lab


def _need_root() -> None:
    if os.geteuid() != 0:
        raise CliError("must run as root (it creates network namespaces and loads BPF programs)")


def cmd_up(args: argparse.Namespace) -> int:
    _need_root()
    lab = _lab()
    opts = lab.LabOptions(
        nodes=args.nodes, prefix=args.prefix, xdp_mode=args.xdp_mode, discovery=args.discovery, preset=args.preset,
        routing=args.routing, servers=args.servers, serve=args.serve,
    )
    try:
        state = lab.Lab(opts).up(wait_s=args.wait)
    except lab.LabError as exc:
        raise CliError(str(exc)) from None
    others = [n for n in state["nodes"] if not lab.is_mix(n) and not lab.is_server(n)]
    mixes = [n for n in state["nodes"] if lab.is_mix(n)]
    servers = [n for n in state["nodes"] if lab.is_server(n)]
    role = " (balancers only)" if state.get("serve") == "none" else ""
    print(f"lab {args.prefix!r} up ({state['routing']} routing): {', '.join(others + mixes)}{role}"
          + (f"; real servers: {', '.join(servers)}" if servers else "") + "; VIPs: "
          + ", ".join(f"{v['address']}:{v['port']} ({v['mode']})" for v in state["vips"]))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _need_root()
    problems = _lab().Lab.down(args.prefix)
    if problems:
        raise CliError("could not remove: " + "; ".join(problems))
    print(f"lab {args.prefix!r} down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab()
    try:
        state = lab.status(args.prefix)
    except lab.LabError as exc:
        raise CliError(str(exc)) from None
    if args.format == "json":
        json.dump(state, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    for name, node in state["nodes"].items():
        extra = ""
        if "agent_pid" in node:
            extra += f" agent={'up' if node['agent_running'] else 'DOWN'}"
        if "app_pid" in node:
            extra += f" app={'up' if node['app_running'] else 'DOWN'}"
        print(f"{name:8} {node['netns']:16} {' '.join(node['addresses'])}{extra}")
    print("VIPs: " + ", ".join(f"{v['address']}:{v['port']}/{v['protocol']} {v['mode']}" for v in state["vips"]))
    print(f"routing: {state['routing']}")
    for d in state.get("daemons", ()):
        print(f"  {d['what']} pid {d['pid']} {'running' if d['running'] else 'NOT RUNNING'}")
    for vip, hops in state.get("next_hops", {}).items():
        print(f"  router: {vip} via {', '.join(hops) or 'nothing (not announced)'}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    _need_root()
    lab = _lab()
    argv = args.argv[1:] if args.argv and args.argv[0] == "--" else args.argv
    try:
        lab.exec_in(args.prefix, args.node, argv)
    except lab.LabError as exc:
        raise CliError(str(exc)) from None
    return 0  # not reached: exec replaced the process


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="a meshlb cluster in network namespaces on this host")
    lsub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    lsub.required = True

    def prefix(q: argparse.ArgumentParser) -> None:
        q.add_argument("--prefix", default="mlb", help="name prefix of the lab's namespaces (default mlb)")

    q = lsub.add_parser("up", help="build the lab and start an agent and an app on every mix")
    q.add_argument("--nodes", type=int, default=3, help="number of mixes (default 3)")
    q.add_argument("--xdp-mode", choices=("native", "generic", "auto"), default="native")
    q.add_argument("--discovery", choices=("unicast", "multicast", "broadcast"), default="unicast")
    q.add_argument("--preset", choices=("lan", "wan", "local"), default="lan")
    q.add_argument("--routing", choices=("static", "bgp", "l2"), default="static",
                   help="how client packets reach the mixes: a static ECMP route on the router (default), "
                        "the router's BGP (BIRD, BFD, multipath; the mixes announce), or one L2 segment "
                        "(no router, the VIP's owner answers ARP/NDP)")
    q.add_argument("--servers", type=int, default=0, metavar="M",
                   help="add real servers srv1..srvM: the demo app and no meshlb, backends of every VIP "
                        "(dr: the VIP on their loopback, LVS-DR style)")
    q.add_argument("--serve", choices=("all", "none"), default="all",
                   help="all: every mix serves the VIPs too (default); none: the mixes only balance, "
                        "to the real servers (dedicated mode; needs --servers)")
    q.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the cluster to converge")
    prefix(q)
    q.set_defaults(func=cmd_up)

    q = lsub.add_parser("status", help="namespaces, addresses, control sockets and VIPs")
    q.add_argument("--format", choices=("table", "json"), default="table")
    prefix(q)
    q.set_defaults(func=cmd_status)

    q = lsub.add_parser("exec", help="run a command inside a node: meshlb lab exec NODE -- CMD ...")
    q.add_argument("node", help="client, router, mixN or srvN")
    q.add_argument("argv", nargs=argparse.REMAINDER, help="the command (after --)")
    prefix(q)
    q.set_defaults(func=cmd_exec)

    q = lsub.add_parser("down", help="stop the lab's processes and remove everything it made")
    prefix(q)
    q.set_defaults(func=cmd_down)

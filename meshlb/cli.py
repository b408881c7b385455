"""The ``meshlb`` command line.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``
(registering its arguments and setting ``func``) so this file stays a table of
contents. Failures exit non-zero with one line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module path for each subcommand group; a module missing here is simply not offered
_COMMAND_MODULES = (
    "meshlb.agent_cli",
    "meshlb.lab.cli",
    "meshlb.cluster.sim_cli",
)


class CliError(Exception):
    """A failure the user can act on; printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlb", description="meshlb: a layer-4 load balancer on every application host (XDP + gossip)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except CliError as exc:
        print(f"meshlb {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    # run through the imported module so CliError is one class for every subcommand
    from meshlb.cli import main as _main

    sys.exit(_main())

"""The ``meshlb`` command line.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``
(registering its arguments and setting ``func``) so this file stays a table of
contents. Failures exit non-zero with one line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from meshlb import __version__

# module path for each subcommand group; a module missing here is simply not offered
_COMMAND_MODULES = (
    "meshlb.agent_cli",
    "meshlb.top_cli",
    "meshlb.lab.cli",
    "meshlb.cluster.sim_cli",
)


class CliError(Exception):
    """A failure the user can act on; printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlb", description="meshlb: a layer-4 load balancer on every application host (XDP + gossip)"
    )
    parser.add_argument("--version", action="version", version=f"meshlb {__version__}")
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
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version or a usage error, printed by argparse
            sys.stdout.flush()
            return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
        try:
            rc = args.func(args)
        except CliError as exc:
            print(f"meshlb {args.command}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        # output that fit the buffer meets a closed pipe only here
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left (`meshlb stats | head`): end quietly with the status of a
        # Unix tool that SIGPIPE ended; stdout goes to /dev/null so that the flush at
        # exit does not complain about the pipe again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return int(rc or 0)

if __name__ == "__main__":
    # run through the imported module so CliError is one class for every subcommand
    from meshlb.cli import main as _main

    sys.exit(_main())

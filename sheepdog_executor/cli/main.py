"""The ``sheepdog-executor`` command line: its parser, and the dispatch to ``doctor`` and ``cleanup``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sheepdog_executor import registry
from sheepdog_executor.cli.cleanup import cleanup
from sheepdog_executor.cli.doctor import Doctor
from sheepdog_executor.cli.sweeps import sweeps
from sheepdog_executor.options import ExecutorOptions, declared

if TYPE_CHECKING:
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 when everything is fine)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command == "doctor":
        explicit = {"python": args.python, "callback_address": args.callback_address}
        explicit = {k: v for k, v in explicit.items() if v is not None}
        return Doctor(args.host, explicit, args.timeout, scheduler=args.scheduler).run()
    if args.command == "cleanup":
        return cleanup(
            args.host,
            dry_run=args.dry_run,
            force=args.force,
            envs=args.envs,
            choice=args.scheduler,
            sweep=args.sweep,
        )
    if args.command == "sweeps":
        return sweeps(args.host)
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    from sheepdog_executor import __version__

    parser = argparse.ArgumentParser(
        prog="sheepdog-executor",
        description="Check a cluster for an executor, or clean up after crashed clients.",
    )
    parser.add_argument("--version", action="version", version=f"sheepdog-executor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done (debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = _host_command(
        commands,
        "doctor",
        help="check SSH, the scheduler, the nodes' Python and the way back to this client",
        description="Check, in order, what an executor on HOST needs; stop at the first "
        "failure and say what to change. Options come from the config file and SHEEPDOG_* variables.",
    )
    for name, metavar in (("python", "PY"), ("callback_address", "ADDR")):  # executor options
        doc = declared(ExecutorOptions)[name].doc
        doctor.add_argument(f"--{name.replace('_', '-')}", metavar=metavar, help=f"{doc} ({name}=)")
    doctor.add_argument(
        "--timeout", type=float, default=90.0, metavar="S", help="seconds a test job may take (90)"
    )
    clean = _host_command(
        commands,
        "cleanup",
        help="remove jobs and session directories left by clients that died",
        description="Remove your jobs that run a sheepdog worker from a session directory whose "
        "client is gone, and session directories left without a client.",
    )
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    clean.add_argument(
        "--force",
        action="store_true",
        help="also remove sessions whose client cannot be checked (never those known to be alive)",
    )
    clean.add_argument(
        "--envs",
        action="store_true",
        help='also remove the environments of environment="sync" (rebuilt when next needed)',
    )
    clean.add_argument(
        "--sweep", metavar="NAME", help="also remove the sweep NAME and its kept results (never one in use)"
    )
    _host_command(
        commands,
        "sweeps",
        help="list the sweeps (sweep=) kept on the cluster",
        description="List the sweeps kept under the session root: calls done, running and failed, "
        "and their size on disk.",
    )
    return parser


def _host_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand that works on one head node: its HOST and --scheduler arguments."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("host", metavar="HOST", help="host name or ~/.ssh/config alias of the head node")
    parser.add_argument(
        "--scheduler",
        choices=("auto", *registry.entries()),
        default="auto",
        help="the head node's scheduler (auto: the one whose commands it has; Grid Engine if both)",
    )
    return parser

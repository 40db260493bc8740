"""The `stablepipe` command: one subcommand per task, the same flag names everywhere.

Each subcommand is a module of this package with a `register(commands)` function; the modules are
listed in `COMMANDS`, in the order `--help` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from stablepipe.cli.common import UsageError

COMMANDS = ("generate", "img2img", "inpaint", "depth2img", "variation", "upscale", "ldm3d", "ui", "serve", "batch", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablepipe", description="Stable Diffusion pipelines, from scratch in PyTorch."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"stablepipe.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"stablepipe.cli.{name}":
                raise
            continue  # not built yet
        module.register(commands)
    return parser


def print_scheduler_names() -> int:
    from stablepipe.schedulers.names import list_scheduler_names

    print("\n".join(list_scheduler_names()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--scheduler" in argv and argv[argv.index("--scheduler") + 1 :][:1] == ["list"]:
        return print_scheduler_names()
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "json", False) or getattr(args, "quiet", False)

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    try:
        report = args.run(args, say)
    except (UsageError, ValueError, TypeError, FileNotFoundError, OSError) as err:
        if os.environ.get("STABLEPIPE_DEBUG"):
            raise
        print(f"stablepipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        for entry in report.get("files", []):
            print(f"wrote {entry['path']} (seed {entry['seed']})")
    return 0

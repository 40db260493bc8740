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

COMMANDS = (
    "generate", "img2img", "inpaint", "depth2img", "variation", "upscale", "ldm3d", "ui", "serve", "batch", "convert",
)


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
        report = run_command(args, say)
    except KeyboardInterrupt:  # Ctrl-C: one line; files are written atomically, so none is left half-written
        start = "" if quiet else "\n"  # past a progress bar's line
        print(f"{start}stablepipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError, MemoryError, RuntimeError) as err:
        # FloatingPointError: a NaN / inf picture, with what to do about it
        if os.environ.get("STABLEPIPE_DEBUG") or (isinstance(err, RuntimeError) and not is_out_of_memory(err)):
            raise
        print(f"stablepipe {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        for entry in report.get("files", []):
            print(f"wrote {entry['path']} (seed {entry['seed']})")
    return 0


def run_command(args: argparse.Namespace, say):
    """The checks every command shares (--from-png, sizes, a prompt), then the command."""
    from stablepipe.cli.common import check_size_flags

    if getattr(args, "from_png", None):
        from stablepipe.cli.from_png import apply_png

        apply_png(args, say)
    check_size_flags(args)
    if hasattr(args, "overwrite") and hasattr(args, "num_images"):  # an existing --out is refused before any work
        from stablepipe.output_files import output_paths

        output_paths(args.out, [0] * max(args.num_images, 1), overwrite=args.overwrite)
    if hasattr(args, "prompt") and args.prompt is None:
        raise UsageError("give a PROMPT, or --from-png FILE to take the prompt and settings from a picture")
    return args.run(args, say)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA / CPU allocation failures (RuntimeError subclasses), told apart from other runtime errors."""
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def one_line(err: BaseException) -> str:
    if isinstance(err, MemoryError) or is_out_of_memory(err):
        return ("not enough memory for this run; try a smaller --width / --height, fewer --num-images, or "
                f"--dtype float16 on a GPU ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    return str(err)

"""`stablepipe convert`: a single-file checkpoint to a diffusers folder, or a diffusers folder to a single file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stablepipe.cli.common import DTYPES, UsageError
from stablepipe.loading.components import SINGLE_FILE_SUFFIXES


def register(commands) -> None:
    parser = commands.add_parser(
        "convert", help="single file <-> diffusers folder",
        description="Convert a .safetensors/.ckpt checkpoint (original layout) to a diffusers folder, or back.",
    )
    parser.add_argument("source", help="a .safetensors/.ckpt file, or a diffusers folder (one with model_index.json)")
    parser.add_argument("target", help="the folder to write, or the .safetensors/.ckpt file to write")
    parser.add_argument("--config", help="file -> folder: a diffusers folder or Hub repo id describing the checkpoint")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="override the detected one")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (default: keep float32)")
    parser.add_argument(
        "--text-encoder-layout", choices=("clip", "open_clip"),
        help="folder -> file: write the text encoder in CLIP (SD 1.x) or OpenCLIP (SD 2.x) names (default: guess)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target file or folder")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    import torch

    source, target = Path(args.source), Path(args.target)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if source.is_file() and source.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return file_to_folder(source, target, args, dtype, say)
    if source.is_dir() and (source / "model_index.json").is_file():
        if target.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UsageError(f"the target of a folder -> file conversion must end in .safetensors or .ckpt: {target}")
        from stablepipe.loading.single_file import save_single_file
        from stablepipe.output_files import refuse_existing, write_atomically

        refuse_existing(target, overwrite=args.overwrite, flag="target")
        check_writable(target)
        say(f"Writing {source} as one file ...")
        try:
            write_atomically(target, lambda staging: save_single_file(
                source, staging, text_encoder_layout=args.text_encoder_layout, dtype=dtype), overwrite=args.overwrite)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":  # safetensors' writer reports a full disk its own way
                raise
            raise UsageError(f"cannot write {target}: {err}") from None
        say(f"wrote {target}")
        return {"files": [], "written": str(target), "direction": "folder->file"}
    raise UsageError(f"{source} is neither a .safetensors/.ckpt file nor a diffusers folder with model_index.json")


def file_to_folder(source: Path, target: Path, args: argparse.Namespace, dtype, say) -> dict[str, Any]:
    from stablepipe.output_files import staged_folder
    from stablepipe.pipelines.base import DiffusionPipeline

    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not args.overwrite:
        raise UsageError(f"target {target} exists and is not an empty folder; pass --overwrite to replace it, or "
                         "choose a new folder")
    check_writable(target)
    say(f"Reading {source} ...")
    pipe = DiffusionPipeline.from_single_file(
        source, config=args.config, prediction_type=args.prediction_type, torch_dtype=dtype
    )
    with staged_folder(target, overwrite=args.overwrite) as staging:
        pipe.save_pretrained(staging)
    say(f"wrote {target} ({type(pipe).__name__})")
    return {"files": [], "written": str(target), "direction": "file->folder", "pipeline": type(pipe).__name__}


def check_writable(target: Path) -> None:
    """A UsageError, before any work, when the target's folder cannot be created or written to (tried with a
    scratch file: permission bits do not tell, e.g. for root or read-only mounts)."""
    import tempfile

    parent = next((p for p in (target.parent, *target.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"cannot write {target}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {target}: {parent} is not writable ({err.strerror or err})") from None

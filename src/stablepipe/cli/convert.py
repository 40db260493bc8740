"""`stablepipe convert`: a single-file checkpoint to a diffusers folder, or a diffusers folder to a single file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stablepipe.cli.common import DTYPES, UsageError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".sft")


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

        say(f"Writing {source} as one file ...")
        save_single_file(source, target, text_encoder_layout=args.text_encoder_layout, dtype=dtype)
        say(f"wrote {target}")
        return {"files": [], "written": str(target), "direction": "folder->file"}
    raise UsageError(f"{source} is neither a .safetensors/.ckpt file nor a diffusers folder with model_index.json")


def file_to_folder(source: Path, target: Path, args: argparse.Namespace, dtype, say) -> dict[str, Any]:
    from stablepipe.pipelines.base import DiffusionPipeline

    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty; choose a new folder")
    say(f"Reading {source} ...")
    pipe = DiffusionPipeline.from_single_file(
        source, config=args.config, prediction_type=args.prediction_type, torch_dtype=dtype
    )
    pipe.save_pretrained(target)
    say(f"wrote {target} ({type(pipe).__name__})")
    return {"files": [], "written": str(target), "direction": "file->folder", "pipeline": type(pipe).__name__}

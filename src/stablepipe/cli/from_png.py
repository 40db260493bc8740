"""`--from-png FILE`: the prompt and settings of a picture, read back from its infotext, to draw it again.

    stablepipe generate --from-png outputs/00012-7.png            # the same picture
    stablepipe generate --from-png outputs/00012-7.png --seed 8   # the same settings, another seed

Works on stablepipe's PNGs and on AUTOMATIC1111's (its `parameters` text chunk). Flags given on the command
line win over the file's values. Settings in the file that stablepipe does not apply (hires fix, LoRA
hashes, another model ...) are reported, since the picture may then differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stablepipe.cli.common import UsageError, open_image_file

# settings read from the infotext -> the flag (argparse name) they fill when not given
FLAGS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "clip_skip", "strength")
INFOTEXT_KEYS = {"strength": "Denoising strength", "clip_skip": "Clip skip", "prompt": "Prompt",
                 "negative_prompt": "Negative prompt"}


def read_png(path: str) -> tuple[dict[str, Any], dict[str, str], dict[str, Any] | None]:
    """(settings, keys not read, stablepipe's JSON settings or None) of the PNG at `path`."""
    from stablepipe.infotext import read_settings

    image = open_image_file(path, flag="--from-png")
    chunks = getattr(image, "text", None) or image.info
    text = chunks.get("parameters")
    if not text:
        raise UsageError(f"--from-png {path}: the picture has no 'parameters' infotext (stablepipe writes one; "
                         "AUTOMATIC1111 does with 'Save text information about generation parameters' on)")
    try:
        settings, others = read_settings(text)
    except ValueError as err:
        raise UsageError(f"--from-png {path}: {err}") from None
    try:
        ours = json.loads(chunks["stablepipe"]) if "stablepipe" in chunks else None
    except ValueError:
        ours = None  # a damaged chunk: the infotext alone
    return settings, others, ours if isinstance(ours, dict) else None


def apply_png(args: argparse.Namespace, say) -> None:
    """Fill the flags not given from `args.from_png`; record the file's sampler for `load_pipeline`; report what
    the file sets that this command does not apply."""
    settings, others, ours = read_png(args.from_png)
    for name in FLAGS:
        if settings.get(name) is None:
            continue
        if hasattr(args, name) and getattr(args, name) in (None, ""):
            setattr(args, name, settings[name])
        elif not hasattr(args, name) and name not in ("prompt", "negative_prompt"):
            others[INFOTEXT_KEYS.get(name, name)] = str(settings[name])
    if "sampler" in settings and getattr(args, "scheduler", None) is None:
        args.png_sampler = check_sampler(args.from_png, settings["sampler"], settings["schedule_type"])
    if hasattr(args, "prompt_weighting") and not args.prompt_weighting:
        # A1111 always reads its prompt syntax; stablepipe records whether it did
        args.prompt_weighting = True if ours is None else bool(ours.get("prompt_weighting"))
    others.update(model_difference(args, settings))
    if others:
        shown = ", ".join(f"{key}: {value}" for key, value in others.items())
        print(f"note: {args.from_png} also has {shown}; stablepipe does not apply these here, so the picture may "
              "differ", file=sys.stderr)  # a warning: shown with --quiet and --json too
    args.png_not_applied = others


def check_sampler(path: str, sampler: str, schedule: str) -> tuple[str, str]:
    from stablepipe.schedulers.names import A1111_SCHEDULERS, SCHEDULE_TYPES, lookup_scheduler_name

    try:
        lookup_scheduler_name(sampler)
    except ValueError:
        raise UsageError(f"--from-png {path}: its sampler {sampler!r} is not one stablepipe has; pick one with "
                         f"--scheduler (known: {', '.join(A1111_SCHEDULERS)})") from None
    if schedule not in SCHEDULE_TYPES:
        raise UsageError(f"--from-png {path}: its schedule type {schedule!r} is not one stablepipe has "
                         f"({', '.join(SCHEDULE_TYPES)}); pick a sampler with --scheduler")
    return sampler, schedule


def model_difference(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, str]:
    """{'Model hash': ...} when the file's model hash is not the hash of the model this command loads."""
    from stablepipe.builtin import builtin_model_path
    from stablepipe.infotext import local_model_hash
    from stablepipe.model_flags import is_single_file

    wanted = settings.get("model_hash")
    if not wanted or getattr(args, "command", None) != "generate":
        return {}
    source = args.model or builtin_model_path()
    if not is_single_file(source) and not Path(source).exists():
        return {}  # a Hub id: not downloaded here just to compare
    found = local_model_hash(source)
    if found in (None, wanted):
        return {}
    return {"Model hash": f"{wanted} (model {settings.get('model', '?')}; the loaded model's is {found})"}

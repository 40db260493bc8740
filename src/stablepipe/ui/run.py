"""One press of Generate: pick the seeds, run the task, write PNGs with their settings, describe the result.

The PNGs carry the prompt and settings in their metadata exactly as the command line writes them
(`parameters` in AUTOMATIC1111's format, and `stablepipe` as JSON): what the page offers for download are
these files. No gradio here.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from stablepipe.output_files import output_paths, save_png
from stablepipe.ui.session import ModelManager
from stablepipe.ui.tasks import TASKS, Output

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000  # the text encoder reads 77 tokens (prompt weighting: 75-token chunks); 10k is ~30 chunks
PROMPT_LABELS = (("prompt", "Prompt"), ("negative_prompt", "Negative prompt"))
SHOWN_APART = ("command", "seed", "prompt", "negative_prompt")


@dataclasses.dataclass
class Result:
    """What one run wrote and what the page shows about it."""

    files: list[Path]
    seeds: list[int]
    settings: dict[str, Any]
    depth_files: list[Path] = dataclasses.field(default_factory=list)
    extra_files: list[Path] = dataclasses.field(default_factory=list)  # e.g. the painted mask
    flagged: list[int] = dataclasses.field(default_factory=list)  # seeds whose image the safety checker blacked out

    @property
    def captions(self) -> list[str]:
        return [f"seed {seed}" for seed in self.seeds]

    def describe(self) -> str:
        """Markdown for the page: the seeds, the prompts, then the other settings on one line."""
        seeds = ", ".join(str(s) for s in self.seeds)
        lines = [f"**Seed{'s' if len(self.seeds) > 1 else ''}: {seeds}**"]
        lines += [f"{label}: {self.settings[key]}" for key, label in PROMPT_LABELS if self.settings.get(key)]
        others = {k: v for k, v in self.settings.items() if k not in SHOWN_APART and v not in (None, "")}
        lines.append(" · ".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in others.items()))
        if self.flagged:
            lines.append(f"The safety checker flagged seed {', '.join(map(str, self.flagged))}: blacked out.")
        return "  \n".join(lines)


def pick_seeds(seed: float | int | None, batch: float | int) -> list[int]:
    """`batch` consecutive seeds from `seed`; a random first seed when `seed` is empty or negative."""
    if batch is None or int(batch) != batch or batch < 1:
        raise ValueError(f"batch size must be a whole number >= 1, got {batch}")
    if seed is None or seed < 0:
        seed = random.randrange(MAX_SEED)
    if int(seed) != seed or seed > MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} (or -1 for a random one), got {seed}")
    return [int(seed) + i for i in range(int(batch))]


def check_prompts(values: dict[str, Any]) -> None:
    """Prompts are text of at most MAX_PROMPT_CHARS characters."""
    for key, label in PROMPT_LABELS:
        text = values.get(key)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{label} must be text, got {type(text).__name__}")
        if text and len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"{label} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are taken (the "
                             "text encoder reads 77 tokens at a time)")


def shared_settings(manager: ModelManager, task: str, values: dict[str, Any], output: Output) -> dict[str, Any]:
    """The settings of one run as the command line records them (and from them, A1111's infotext)."""
    from stablepipe.schedulers.names import a1111_names_of

    width, height = output.images[0].size
    sampler, schedule = a1111_names_of(output.pipe.scheduler) if output.pipe is not None else (None, None)
    settings = {
        "command": task, "prompt": values.get("prompt"), "negative_prompt": values.get("negative_prompt") or None,
        "steps": values.get("steps"), "guidance": values.get("guidance"),
        "scheduler": values.get("scheduler") or "model default", "sampler": sampler, "schedule_type": schedule,
        "width": width, "height": height, "model": output.model,
        "model_hash": manager.model_hash(output.slot) if output.slot else None, **output.settings,
    }
    if values.get("prompt_weighting"):  # as the command line records --prompt-weighting
        settings["prompt_weighting"] = True
    return settings


def generate(manager: ModelManager, task: str, values: dict[str, Any], out_dir: Path) -> Result:
    """Run `task` (a key of TASKS) with the form's `values`; save every image under `out_dir` under new names."""
    check_prompts(values)
    seeds = pick_seeds(values.get("seed"), values.get("batch", 1))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    output = TASKS[task](manager, values, generators)
    settings = shared_settings(manager, task, values, output)
    companions = ("-depth",) * bool(output.depth) + tuple(f"-{name}" for name in output.extras)
    files = output_paths(str(out_dir), seeds[: len(output.images)], companions=companions)
    save_all(output.images, files, settings, seeds)
    depth_files = [path.with_name(path.stem + "-depth.png") for path in files] if output.depth else []
    save_all(output.depth or [], depth_files, {**settings, "depth": True}, seeds)
    extra_files = [files[0].with_name(f"{files[0].stem}-{name}.png") for name in output.extras]
    save_all(output.extras.values(), extra_files, settings, [seeds[0]] * len(extra_files))
    flagged = [seed for seed, flag in zip(seeds, output.flags or []) if flag]
    return Result(files, seeds, settings, depth_files, extra_files, flagged)


def save_all(images, paths: list[Path], settings: dict[str, Any], seeds: list[int]) -> None:
    for image, path, seed in zip(images, paths, seeds):
        save_png(image, path, {**settings, "seed": seed})

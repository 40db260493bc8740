"""A batch job file: one JSON object per line, each the request for one image, checked up front.

    {"prompt": "a red circle", "seed": 1, "steps": 20, "sampler": "Euler a", "guidance": 7}
    {"task": "img2img", "prompt": "a green square", "image": "in/photo.png", "strength": 0.6}
    {"task": "inpaint", "prompt": "a blue triangle", "image": "in/photo.png", "mask": "in/mask.png"}
    {"task": "upscale", "prompt": "sharp", "image": "in/small.png"}

Image and mask paths are relative to the job file. A line without a seed gets one derived from the line (its
number and settings), so a resumed run draws the same picture. Each request has a stable id, its line number
and a hash of its settings, which names its output file and its manifest record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

TASKS = ("txt2img", "img2img", "inpaint", "upscale")
IMAGE_TASKS = ("img2img", "inpaint", "upscale")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit value
MAX_ERRORS = 20  # errors listed before the rest are only counted

# field -> what it must be, as the error message says it
FIELDS = {
    "prompt": "a string", "negative_prompt": "a string", "seed": f"an integer from 0 to {MAX_SEED}",
    "width": "a positive multiple of 8", "height": "a positive multiple of 8", "steps": "an integer >= 1",
    "sampler": "a sampler name (`stablepipe generate --scheduler list`)", "guidance": "a number >= 0",
    "task": f"one of {', '.join(TASKS)}", "image": "a path to a picture, relative to the job file",
    "mask": "a path to a mask picture, relative to the job file", "strength": "a number from 0 to 1",
}
DEFAULT_FIELDS = ("negative_prompt", "width", "height", "steps", "sampler", "guidance", "strength")
NEEDS = {"txt2img": (), "img2img": ("image",), "inpaint": ("image", "mask"), "upscale": ("image",)}
REFUSES = {"txt2img": ("image", "mask", "strength"), "img2img": ("mask",), "inpaint": (),
           "upscale": ("mask", "strength", "width", "height")}  # fields a task cannot use


class JobFileError(ValueError):
    """The job file has lines that cannot be run; the message lists each (file, line, field, what to fix)."""


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """One line of the job file, checked, with its seed resolved. Unset settings are None: the pipeline's
    defaults fill them, as `stablepipe generate` does."""

    line: int  # 1-based line number in the job file
    id: str  # "000012-3f9a0c1d2e": line number and settings hash; the output is `{id}.png`
    prompt: str
    seed: int
    seed_derived: bool  # True when the line gave no seed
    task: str = "txt2img"
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    strength: float | None = None
    image: str | None = None  # absolute path
    mask: str | None = None  # absolute path

    @property
    def file_name(self) -> str:
        return f"{self.id}.png"

    def input_paths(self) -> list[str]:
        return [p for p in (self.image, self.mask) if p]

    def batch_key(self) -> Hashable:
        """Jobs with equal keys can share one pipeline call (what `stablepipe.batching.group_requests` groups
        by); upscale jobs run one at a time."""
        if self.task == "upscale":
            return ("upscale", self.line)
        return (self.task, self.width, self.height, self.steps, self.sampler, self.guidance, self.strength)


def read_jobs(path: str | Path, *, defaults: Mapping[str, Any] | None = None) -> list[BatchJob]:
    """Every line of the JSONL file at `path` as a BatchJob; `defaults` (field -> value) fill fields a line
    leaves out. Raises JobFileError listing every bad line, before anything is drawn."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no job file at {path}: pass a JSONL file, one request per line")
    jobs, errors = [], []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            jobs.append(parse_line(text, number, path.parent, defaults or {}))
        except ValueError as err:
            errors.append(f"{path.name} line {number}: {err}")
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise JobFileError("the job file has bad lines:\n" + "\n".join(errors[:MAX_ERRORS]) + more)
    if not jobs:
        raise JobFileError(f"{path} has no requests: write one JSON object per line, e.g. {{\"prompt\": \"a cat\"}}")
    return jobs


def parse_line(text: str, number: int, folder: Path, defaults: Mapping[str, Any]) -> BatchJob:
    """One line -> a BatchJob, or a ValueError naming the field."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object like {{\"prompt\": \"a cat\"}}, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field `{unknown[0]}`; the fields are {', '.join(FIELDS)}")
    given = {k: v for k, v in fields.items() if v is not None}
    for name, value in given.items():
        check_field(name, value)
    task = given.get("task", "txt2img")
    usable = set(DEFAULT_FIELDS) - set(REFUSES[task])  # e.g. a default --width is not for upscale lines
    settings = {**{k: v for k, v in defaults.items() if v is not None and k in usable}, **given, "task": task}
    check_task_fields(task, settings)
    paths = {k: str(resolve_picture(folder, settings[k], k)) for k in ("image", "mask") if k in settings}
    if task in ("img2img", "inpaint"):
        settings.update(picture_size(paths["image"], settings))
    seed = settings.pop("seed", None)
    digest = settings_hash(number, settings)
    if seed is None:
        seed = int(digest[:8], 16)  # 32 bits, as `generate` draws a random seed
    job_id = f"{number:06d}-{settings_hash(number, {**settings, 'seed': seed})[:10]}"
    return BatchJob(line=number, id=job_id, seed=seed, seed_derived="seed" not in given,
                    **{**settings, "prompt": settings.get("prompt", ""), **paths})


def check_field(name: str, value: Any) -> None:
    """A ValueError naming `name` when `value` is not what FIELDS says it must be."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = {
        "seed": is_int and 0 <= value <= MAX_SEED,
        "width": is_int and value > 0 and value % 8 == 0, "height": is_int and value > 0 and value % 8 == 0,
        "steps": is_int and value >= 1, "guidance": is_number and value >= 0,
        "strength": is_number and 0 <= value <= 1, "task": value in TASKS,
    }.get(name, isinstance(value, str))
    if not ok:
        raise ValueError(f"`{name}` must be {FIELDS[name]}, got {value!r}")
    if name == "sampler":
        from stablepipe.schedulers.names import join_a1111_name

        try:
            join_a1111_name(value)
        except ValueError as err:
            raise ValueError(f"`sampler`: {err}") from None


def check_task_fields(task: str, settings: Mapping[str, Any]) -> None:
    """The fields each task needs, and none it cannot use."""
    if task != "upscale" and "prompt" not in settings:
        raise ValueError("`prompt` is missing: every txt2img / img2img / inpaint line needs one")
    for name in NEEDS[task]:
        if name not in settings:
            raise ValueError(f"`{name}` is missing: {task} lines need {FIELDS[name]}")
    for name in REFUSES[task]:
        if name in settings:
            hint = "the output is 4x the input" if task == "upscale" and name in ("width", "height") else "drop it"
            raise ValueError(f"`{name}` is not used by task {task!r}: {hint}")


def resolve_picture(folder: Path, value: str, name: str) -> Path:
    """The picture file `value` names (relative to the job file's folder), checked to be one PIL can read."""
    import PIL.Image

    path = (folder / value).resolve()
    if not path.is_file():
        raise ValueError(f"`{name}`: no file at {path} (paths are relative to the job file)")
    try:
        with PIL.Image.open(path) as picture:
            picture.size  # noqa: B018  (reads the header only)
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"`{name}`: {path} is not a picture PIL can read ({err})") from None
    return path


def picture_size(path: str, settings: Mapping[str, Any]) -> dict[str, int]:
    """width and height of an image task: as given, else the picture's own rounded down to multiples of 8."""
    import PIL.Image

    with PIL.Image.open(path) as picture:
        width, height = picture.size
    size = {"width": settings.get("width", width - width % 8), "height": settings.get("height", height - height % 8)}
    if min(size.values()) < 8:
        raise ValueError(f"`image` {path} is {width}x{height}: too small, it needs at least 8x8 pixels")
    return size


def settings_hash(line: int, settings: Mapping[str, Any]) -> str:
    """sha256 of the line number and settings, in a canonical JSON form (stable across runs and machines)."""
    canonical = json.dumps({"line": line, **settings}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()

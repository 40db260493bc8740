"""Writing output files (PNGs with their settings) without ever replacing a user's file by surprise.

- New names never collide: images in a folder are numbered from one past the highest number there (as
  AUTOMATIC1111 numbers its outputs), so deleting a picture never makes the next run reuse its name.
- An explicit target that exists is refused (FileExistsError) unless `overwrite` is given.
- Every write is atomic: the file is written under a temporary name in the same folder and renamed into
  place, so a crash or Ctrl-C never leaves half a file under the real name.
- A PNG carries its settings as text chunks: `parameters` (AUTOMATIC1111's infotext) and `stablepipe` (JSON).

The command line and the web app write their pictures through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stablepipe.infotext import a1111_params, format_infotext, model_name

_NUMBERED = re.compile(r"^(\d+)-")


def refuse_existing(path: Path, *, overwrite: bool, flag: str = "--out") -> None:
    """A FileExistsError when `path` exists and `overwrite` is off, naming the flag that allows it."""
    if path.exists() and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise FileExistsError(
            f"{flag} {path}: that {kind} exists; pass --overwrite to replace it, or choose a new name"
        )


def next_number(folder: Path) -> int:
    """One past the highest leading number of a file name in `folder` (`00012-7.png` -> 13); 0 if none."""
    if not folder.is_dir():
        return 0
    numbers = [int(m[1]) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def free_numbered_names(folder: Path, names: Callable[[int], list[str]], count: int) -> list[Path]:
    """`count` paths `folder / names(n)[i]`, numbered from `next_number(folder)` up, none of whose names
    (`names(n)` lists every file one image writes, e.g. its depth map too) exist yet."""
    paths, number = [], next_number(folder)
    while len(paths) < count:
        if not any((folder / name).exists() for name in names(number)):
            paths.append(folder / names(number)[0])
        number += 1
    return paths


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` with the same suffix (writers pick the format by the suffix)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_atomically(path: Path, write: Callable[[Path], object], *, overwrite: bool) -> None:
    """`write(temporary path)`, then the file moved to `path` in one step. Without `overwrite`, an existing
    `path` is left alone and a FileExistsError raised (a hard link claims the name only if it is free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(path)
    try:
        write(staging)
        if overwrite:
            os.replace(staging, path)
        else:
            claim(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def claim(staging: Path, path: Path) -> None:
    """Move `staging` to `path` unless `path` exists (then a FileExistsError), atomically where links work."""
    try:
        os.link(staging, path)
    except FileExistsError:
        refuse_existing(path, overwrite=False)
    except OSError:  # no hard links here (e.g. FAT, some network drives): check, then rename
        refuse_existing(path, overwrite=False)
        os.replace(staging, path)


@contextlib.contextmanager
def staged_folder(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """A staging folder beside `target` to write into; on success it becomes `target` (a non-empty `target`
    is refused unless `overwrite`, and then replaced only once the new one is complete)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        refuse_existing(target, overwrite=overwrite, flag="target")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- PNGs with their settings ---------------------------------------------------------------------------------


def output_paths(out: str, seeds: list[int], suffix: str = "", *, overwrite: bool = False,
                 companions: tuple[str, ...] = ()) -> list[Path]:
    """Where each image goes. `--out x.png`: x.png for one image (refused if it exists, unless `overwrite`),
    x-N.png for several, N counting from the first number free. A folder: NNNNN-SEED.png, numbered from one past
    the highest number there (A1111's scheme), so a name is never reused. `companions`: the suffixes of the
    files written beside each image (e.g. "-depth"), which must be free too."""
    target = Path(out)
    if target.suffix.lower() == ".png":
        if len(seeds) == 1:
            paths = [target.with_name(target.stem + suffix + end + ".png") for end in ("", *companions)]
            for path in paths:
                refuse_existing(path, overwrite=overwrite)
            return paths[:1]
        if overwrite:
            return [target.with_name(f"{target.stem}-{i}{suffix}.png") for i in range(len(seeds))]
        return free_indexed_names(target, suffix, len(seeds), companions)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"--out {target}: that is a file, not a folder; give a folder or a .png name")

    def names(number: int) -> list[str]:
        return [f"{number:05d}-{seeds[0]}{suffix}{end}.png" for end in ("", *companions)]

    first = free_numbered_names(target, names, 1)[0]
    number = int(first.name.split("-")[0])
    return [target / f"{number + i:05d}-{seed}{suffix}.png" for i, seed in enumerate(seeds)]


def free_indexed_names(target: Path, suffix: str, count: int, companions: tuple[str, ...]) -> list[Path]:
    """`count` names STEM-N.png from the lowest N at which all of them (and their companions) are free."""
    start = 0
    while True:
        paths = [target.with_name(f"{target.stem}-{start + i}{suffix}.png") for i in range(count)]
        if not any(p.with_name(p.stem + end + ".png").exists() for p in paths for end in ("", *companions)):
            return paths
        start += 1


def png_info(settings: dict[str, Any]):
    """The PNG text chunks of one image: `parameters` (A1111's infotext) and `stablepipe` (the settings as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext_of(settings))
    info.add_text("stablepipe", json.dumps(settings))
    return info


def infotext_of(settings: dict[str, Any]) -> str:
    """A1111's infotext of one image from stablepipe's settings (as `write_images` and the web app record them)."""
    loras, model = settings.get("lora_hashes"), settings.get("model")
    params = a1111_params(
        steps=settings["steps"], sampler=settings["sampler"], schedule_type=settings.get("schedule_type"),
        cfg_scale=settings["guidance"], seed=settings["seed"], width=settings["width"], height=settings["height"],
        model_hash=settings.get("model_hash"), model=model_name(model) if model else None,
        denoising_strength=settings.get("strength"), clip_skip=settings.get("clip_skip"), lora_hashes=loras,
    )
    return format_infotext(settings.get("prompt") or "", settings.get("negative_prompt"), params)


def save_png(image, path: Path, settings: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a PNG with its settings as text chunks (see `png_info`), atomically; an existing `path` is refused
    unless `overwrite`."""
    info = png_info(settings)
    write_atomically(Path(path), lambda staging: image.save(staging, format="PNG", pnginfo=info), overwrite=overwrite)

"""Writing output files without ever replacing a user's file by surprise.

- New names never collide: images in a folder are numbered from one past the highest number there (as
  AUTOMATIC1111 numbers its outputs), so deleting a picture never makes the next run reuse its name.
- An explicit target that exists is refused unless the command was given `--overwrite`.
- Every write is atomic: the file is written under a temporary name in the same folder and renamed into
  place, so a crash or Ctrl-C never leaves half a file under the real name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from stablepipe.cli.common import UsageError

_NUMBERED = re.compile(r"^(\d+)-")


def refuse_existing(path: Path, *, overwrite: bool, flag: str = "--out") -> None:
    """A UsageError when `path` exists and `overwrite` is off, naming the flag that allows it."""
    if path.exists() and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise UsageError(f"{flag} {path}: that {kind} exists; pass --overwrite to replace it, or choose a new name")


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
    `path` is left alone and a UsageError raised (a hard link claims the name only if it is free)."""
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
    """Move `staging` to `path` unless `path` exists (then a UsageError), atomically where links work."""
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

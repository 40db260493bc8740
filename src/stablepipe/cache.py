"""stablepipe's cache folder: the built-in models, the CLIP vocabulary and the model-hash table live there.

`$STABLEPIPE_CACHE`, else `$XDG_CACHE_HOME/stablepipe`, else `~/.cache/stablepipe`. Nothing here imports
the rest of the package.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

FINISHED_MARK = "model_index.json"  # a folder in the cache is complete once this file is in it


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    base = os.environ.get("STABLEPIPE_CACHE") or Path(xdg, "stablepipe")
    return Path(base)


def cached_build(name: str, build: Callable[[Path], object]) -> Path:
    """`cache_dir() / name`, made by `build(folder)` on first use. `build` writes into a staging folder that is
    renamed into place, so a half-built folder is never found; when two processes build at once, the first
    rename wins and the other's copy is dropped. `build` must leave `FINISHED_MARK` in the folder."""
    folder = cache_dir() / name
    if not (folder / FINISHED_MARK).is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return folder

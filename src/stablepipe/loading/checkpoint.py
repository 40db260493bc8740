"""Reading and writing single weight files (`.safetensors`, `.ckpt`, `.pt`, `.bin`) safely.

A pickled checkpoint is read with torch's `weights_only` unpickler: tensors, containers and numbers only, so
no code in the file can run. Training metadata that some old checkpoints carry (PyTorch Lightning callbacks)
is replaced by an inert placeholder; anything else that needs code to unpickle is refused with a clear error.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Globals that carry only training bookkeeping; unpickled as `IgnoredObject`, so none of their code runs.
IGNORABLE_GLOBAL_PREFIXES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")


class CheckpointError(ValueError):
    """A weight file that cannot be read: truncated, corrupt, or needing code to unpickle."""


class IgnoredObject:
    """Stands in for a pickled training-metadata object; accepts and drops whatever it is built from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


@dataclass
class Checkpoint:
    """The tensors of one file, flat by name, plus what else it said (global_step, safetensors metadata)."""

    path: Path
    state: dict[str, torch.Tensor]
    global_step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read a `.safetensors` or pickled checkpoint; Lightning's `{"state_dict": ...}` wrapper is unwrapped.
    With `dtype`, a `.safetensors` file's floating-point tensors are converted as they are read (less memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_safetensors(path, dtype)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_pickle(path)
    raise CheckpointError(
        f"{path.name}: unknown weight file type {path.suffix!r}; expected .safetensors, .ckpt, .pt, .pth or .bin"
    )


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names in a checkpoint: from a .safetensors header alone, else by reading the file."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from stablepipe.loading.files import safetensors_header

        try:
            return [key for key in safetensors_header(path) if key != "__metadata__"]
        except OSError as err:  # unreadable; a damaged header raises its own CheckpointError
            raise corrupt_error(path, err) from err
    return list(read_checkpoint(path).state)


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    from stablepipe.loading import files

    try:
        metadata = files.safetensors_metadata(path)
        state = files.read_safetensors(path, dtype)
    except CheckpointError:
        raise
    except OSError as err:  # unreadable (permissions, I/O)
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}). It is probably truncated or corrupt: "
            "download it again and compare its size or hash with the source."
        ) from err
    step = metadata.get("global_step") or metadata.get("ss_steps")
    return Checkpoint(path, state, global_step=int(step) if step and step.isdigit() else None, metadata=metadata)


def read_pickle(path: Path) -> Checkpoint:
    """A pickled checkpoint through `torch.load(weights_only=True)`: no code in the file ever runs."""
    return unwrap(path, load_pickle(path))


def load_pickle(path: Path) -> Any:
    """Whatever a pickle holds (tensors, containers, numbers, strings), loaded without running code."""
    check_zip_sizes(path)
    unsafe = unsafe_globals(path)
    blocked = [name for name in unsafe if not name.startswith(IGNORABLE_GLOBAL_PREFIXES)]
    if blocked:
        raise needs_code_error(path, ", ".join(blocked[:5]))
    stand_ins = [(IgnoredObject, name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the legacy (non-zip) format, checked only while loading
        reasons = [line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line]
        reason = reasons[0] if reasons else "it refers to code outside torch's safe set"
        raise CheckpointError(
            f"{path} could not be read with the safe unpickler ({reason}). Either it is "
            "truncated or corrupt (download it again), or it needs code to unpickle, which stablepipe never runs: "
            "if you trust it, convert it to .safetensors in a separate Python session."
        ) from None
    except Exception as err:  # garbage makes the unpickler fail in many ways (IndexError, KeyError ...)
        raise corrupt_error(path, err) from err
    return loaded


def needs_code_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} needs code to unpickle ({what}), so it was not loaded: stablepipe never runs code from a "
        "checkpoint. If you trust the file, convert it once in a separate Python session "
        "(`torch.load(path, weights_only=False)`, then `safetensors.torch.save_file(state_dict, out)`) and "
        "load the .safetensors file instead."
    )


def corrupt_error(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint ({type(err).__name__}: {err}). It is probably truncated or "
        "corrupt: download it again."
    )


MAX_COMPRESSION_RATIO = 100  # torch writes zip members uncompressed; a re-zipped file stays far below this


def check_zip_sizes(path: Path) -> None:
    """Refuse a zip-format pickle whose members declare more bytes than the file can hold (nothing is read):
    each stored member within the file, compressed ones at most `MAX_COMPRESSION_RATIO` times their size."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise corrupt_error(path, err) from err
    for member in members:
        stored = member.compress_type == zipfile.ZIP_STORED
        limit = file_size if stored else MAX_COMPRESSION_RATIO * member.compress_size
        if member.file_size > limit or member.compress_size > file_size:
            raise CheckpointError(
                f"{path}: zip member {member.filename!r} declares {member.file_size} bytes, more than the file's "
                f"{file_size} bytes can hold; the file is corrupt or forged: download it again"
            )
    if sum(m.file_size for m in members if m.compress_type == zipfile.ZIP_STORED) > file_size:
        raise CheckpointError(f"{path}: its zip members declare more bytes than the file has; it is corrupt")


def unsafe_globals(path: Path) -> list[str]:
    """The globals a zip-format pickle would need beyond torch's safe set (reads the pickle, runs none of it).
    The legacy format cannot be listed; it is checked by the `weights_only` load itself."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as err:  # a damaged zip or pickle stream
        raise corrupt_error(path, err) from err


def unwrap(path: Path, loaded: Any) -> Checkpoint:
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors")
    step = loaded.get("global_step")
    while isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} has no tensors; is it a model checkpoint?")
    return Checkpoint(path, state, global_step=int(step) if isinstance(step, int) else None)


def write_checkpoint(
    state: dict[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write `state` as `.safetensors` (with `metadata`) or, for `.ckpt`/`.pt`, as `{"state_dict": state}`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"write to a .safetensors or .ckpt path, not {path.name!r}")
    return path

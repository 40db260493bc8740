"""Reading and writing single weight files (`.safetensors`, `.ckpt`, `.pt`, `.bin`) safely.

A pickled checkpoint is read with torch's `weights_only` unpickler: tensors, containers and numbers only, so
no code in the file can run. Training metadata that some old checkpoints carry (PyTorch Lightning callbacks)
is replaced by an inert placeholder; anything else that needs code to unpickle is refused with a clear error.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field, replace
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
        try:
            return [key for key in safetensors_header(path) if key != "__metadata__"]
        except OSError as err:  # unreadable; a damaged header raises its own CheckpointError
            raise corrupt_error(path, err) from err
    return list(read_checkpoint(path).state)


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """A `.safetensors` file as a `Checkpoint`: its tensors (see `read_safetensors_state`) and header metadata."""
    try:
        metadata = safetensors_metadata(path)
        state = read_safetensors_state(path, dtype)
    except CheckpointError:
        raise
    except OSError as err:  # unreadable (permissions, I/O)
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}). It is probably truncated or corrupt: "
            "download it again and compare its size or hash with the source."
        ) from err
    step = metadata.get("global_step") or metadata.get("ss_steps")
    return Checkpoint(path, state, global_step=int(step) if step and step.isdigit() else None, metadata=metadata)


# ---- the safetensors format, checked before anything is allocated ---------------------------------------------

JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
                   type(None): "null"}


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library
MAX_DIMS = 64


def damaged(path: Path, problem: str) -> CheckpointError:
    """The one error for a safetensors file whose header does not fit the file."""
    return CheckpointError(
        f"{path} is not a readable safetensors file ({problem}). It is truncated or corrupt (or not a safetensors "
        "file at all): re-download it and compare its size or hash with the source"
    )


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, checked against the file: its bytes are [begin, end) of the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_state(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file read tensor by tensor with plain reads, each floating tensor converted to `dtype` before
    the next is read: loading float32 files into bfloat16 holds the bfloat16 weights plus one float32 tensor,
    not the whole float32 file (memory-mapping would keep every page read resident). Format: an 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
    The header is checked against the file's size before anything is allocated (`CheckpointError` if wrong)."""
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        header, entries = _checked_header(handle, path)
        for entry in entries:
            handle.seek(8 + entry.begin)
            data = bytearray(entry.end - entry.begin)
            if handle.readinto(data) != len(data):  # the file shrank while being read
                raise damaged(path, f"the file ends inside tensor {entry.name!r}")
            tensor = torch.frombuffer(data, dtype=entry.dtype) if data else torch.empty(0, dtype=entry.dtype)
            tensor = tensor.reshape(entry.shape)
            state[entry.name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def _checked_header(handle, path: Path) -> tuple[dict[str, Any], list[TensorEntry]]:
    """A safetensors file's JSON header and its tensors, every offset checked against the file's size (the
    entries' offsets are made relative to the file's start)."""
    file_size = os.fstat(handle.fileno()).st_size
    size = int.from_bytes(handle.read(8), "little")
    if file_size < 8 or not 2 <= size <= min(MAX_HEADER_BYTES, file_size - 8):
        raise damaged(path, f"header length {size} is not plausible for a file of {file_size} bytes")
    try:
        header = json.loads(handle.read(size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise damaged(path, f"its header is not valid JSON ({str(err)[:200]})") from None
    if not isinstance(header, dict):
        raise damaged(path, f"its header is a JSON {JSON_TYPE_NAMES.get(type(header), '?')}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged(path, "its header's __metadata__ is not an object of strings")
    entries = tensor_entries(header, data_size=file_size - 8 - size, path=path)
    return header, [replace(e, begin=e.begin + size, end=e.end + size) for e in entries]


def tensor_entries(header: dict[str, Any], *, data_size: int, path: Path) -> list[TensorEntry]:
    """The header's tensors in file order, each checked: known dtype, a shape of non-negative ints, data_offsets
    within the `data_size` bytes after the header, as many bytes as shape x dtype size, and no two overlapping."""
    entries = sorted(
        (_tensor_entry(name, spec, data_size=data_size, path=path) for name, spec in header.items()
         if name != "__metadata__"),
        key=lambda entry: (entry.begin, entry.end),
    )
    for before, after in zip(entries, entries[1:]):
        if after.begin < before.end:
            raise damaged(path, f"tensors {before.name!r} and {after.name!r} overlap (bytes {before.begin}-"
                                f"{before.end} and {after.begin}-{after.end} of the data)")
    return entries


def _tensor_entry(name: str, spec: Any, *, data_size: int, path: Path) -> TensorEntry:
    def refuse(problem: str) -> CheckpointError:
        return damaged(path, f"tensor {name[:200]!r} {problem}")

    if not isinstance(spec, dict):
        raise refuse(f"is described by a JSON {JSON_TYPE_NAMES.get(type(spec), '?')}, not an object")
    kind = SAFETENSORS_DTYPES.get(spec.get("dtype")) if isinstance(spec.get("dtype"), str) else None
    if kind is None:
        raise refuse(f"has dtype {str(spec.get('dtype'))[:40]}, which stablepipe does not read "
                     f"(it reads {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not _ints(shape, MAX_DIMS):
        raise refuse(f"has shape {str(shape)[:80]}, not a list of at most {MAX_DIMS} non-negative integers")
    if not _ints(offsets, 2) or len(offsets) != 2:
        raise refuse(f"has data_offsets {str(offsets)[:80]}, not two non-negative integers [begin, end]")
    begin, end = offsets
    if begin > end:
        raise refuse(f"has data_offsets [{begin}, {end}], which end before they begin")
    if end > data_size:
        raise damaged(path, f"the file ends inside tensor {name[:200]!r} (its data_offsets [{begin}, {end}] reach "
                            f"beyond the file's {data_size} bytes of data)")
    expected = math.prod(shape) * kind.itemsize
    if end - begin != expected:
        raise refuse(f"has {end - begin} bytes but its shape {shape} of {spec['dtype']} needs {expected}")
    return TensorEntry(name, kind, tuple(shape), begin, end)


def _ints(value: Any, max_length: int) -> bool:
    """Whether `value` is a list of at most `max_length` non-negative ints (booleans are not ints here)."""
    return (isinstance(value, list) and len(value) <= max_length
            and all(type(v) is int and v >= 0 for v in value))


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header, checked, without reading tensors: {name: {dtype, shape, data_offsets},
    "__metadata__"}."""
    with open(path, "rb") as handle:
        return _checked_header(handle, path)[0]


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (training steps, format ...)."""
    return dict(safetensors_header(path).get("__metadata__") or {})



# ---- pickles ----------------------------------------------------------------------------------------------------


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

"""Finding files: local diffusers folders and Hub repos (offline from the cache too), weight files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

WEIGHT_NAMES = {
    "diffusers": "diffusion_pytorch_model",
    "transformers": "model",
}


def is_local(path_or_repo_id: str | os.PathLike) -> bool:
    return Path(path_or_repo_id).exists()


def _hub_error(repo_id: str, filename: str, err: Exception) -> Exception:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, HFValidationError):  # e.g. a mistyped local path: "runs/a/step1" cannot be a repo id
        return OSError(f"{repo_id!r} is neither a local folder (no such path) nor a Hub repo id (owner/name)")
    if isinstance(err, RepositoryNotFoundError):
        return OSError(f"{repo_id!r} is neither a local folder nor a Hub repo id that exists (or you lack access)")
    if isinstance(err, RevisionNotFoundError):
        return OSError(f"{repo_id!r} has no revision by that name; check `revision=`")
    if isinstance(err, LocalEntryNotFoundError):
        return OSError(
            f"{filename!r} of Hub repo {repo_id!r} is not in the local cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1). Download it once with network access, or pass a local folder."
        )
    if isinstance(err, EntryNotFoundError):
        return OSError(f"Hub repo {repo_id!r} has no file {filename!r}")
    return OSError(f"could not fetch {filename!r} from Hub repo {repo_id!r}: {err}")


def fetch_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """The local path of `filename` in a folder (or its subfolder), downloading it from the Hub if needed."""
    if is_local(path_or_repo_id):
        path = Path(path_or_repo_id, subfolder or "", filename)
        if not path.is_file():
            raise FileNotFoundError(f"no {filename} in {path.parent}; is this a diffusers folder?")
        return path
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(
            str(path_or_repo_id), filename, subfolder=subfolder, revision=revision, **hub_kwargs
        )
    except Exception as err:  # huggingface_hub raises many kinds; all are turned into one clear error
        raise _hub_error(str(path_or_repo_id), f"{subfolder + '/' if subfolder else ''}{filename}", err) from err
    return Path(local)


def snapshot(
    repo_id: str, *, allow_patterns: Iterable[str], revision: str | None = None, **hub_kwargs: Any
) -> Path:
    """Download (or find in the cache) only the files matching `allow_patterns` of a Hub repo."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=list(allow_patterns), revision=revision, **hub_kwargs)
        )
    except Exception as err:
        raise _hub_error(repo_id, "snapshot", err) from err


def weight_candidates(base: str, variant: str | None) -> list[str]:
    """File names to look for, best first: safetensors over bin, each whole or as a sharded index."""
    names = []
    for ext in ("safetensors", "bin"):
        if variant:
            names += [f"{base}.{variant}.{ext}", f"{base}.{ext}.index.{variant}.json"]
        else:
            names += [f"{base}.{ext}", f"{base}.{ext}.index.json"]
    return names


def find_weight_files(folder: Path, base: str, variant: str | None = None) -> list[Path]:
    """The weight files of one component folder: one file, or all shards of an index."""
    for name in weight_candidates(base, variant):
        path = folder / name
        if path.is_file() and name.endswith(".json"):
            index = json.loads(path.read_text())
            return [folder / shard for shard in sorted(set(index["weight_map"].values()))]
        if path.is_file():
            return [path]
    variant_note = f" of variant {variant!r}" if variant else ""
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing (no such folder)"
    raise FileNotFoundError(
        f"no weights{variant_note} in {folder}: looked for {', '.join(weight_candidates(base, variant))}; "
        f"the folder has {present}"
    )


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file read tensor by tensor with plain reads, each floating tensor converted to `dtype` before
    the next is read: loading float32 files into bfloat16 holds the bfloat16 weights plus one float32 tensor,
    not the whole float32 file (memory-mapping would keep every page read resident). Format: an 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        header, start = _header(handle)
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        for name, entry in entries:
            kind = SAFETENSORS_DTYPES.get(entry["dtype"])
            if kind is None:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which stablepipe does not read")
            begin, end = entry["data_offsets"]
            handle.seek(start + begin)
            data = bytearray(end - begin)
            if handle.readinto(data) != len(data):
                raise ValueError(f"the file ends inside tensor {name!r}")
            tensor = torch.frombuffer(data, dtype=kind) if data else torch.empty(0, dtype=kind)
            tensor = tensor.reshape(entry["shape"])
            state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def _header(handle) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data starts."""
    size = int.from_bytes(handle.read(8), "little")
    if not 2 <= size <= 100_000_000:
        raise ValueError(f"header length {size} is not plausible")
    return json.loads(handle.read(size)), 8 + size


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header, without reading tensors: {name: {dtype, shape, data_offsets}, "__metadata__"}."""
    with open(path, "rb") as handle:
        return _header(handle)[0]


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (training steps, format ...)."""
    return dict(safetensors_header(path).get("__metadata__") or {})


def load_state_dict(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read weights from safetensors or (safely, no code runs) from torch `.bin` / `.ckpt` files; with `dtype`,
    floating-point weights come converted to it."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                state.update(read_safetensors(path, dtype))
            except Exception as err:
                raise OSError(f"{path} is not a readable safetensors file ({err}); re-download it") from err
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise OSError(
                    f"{path} could not be read safely: it is truncated or needs code to unpickle ({reason}); "
                    "stablepipe never runs pickle code. Convert it to .safetensors with a trusted tool."
                ) from None
            state.update(loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded)
    return state


def check_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], *, where: str
) -> None:
    """Raise one clear error if `state` does not fit `module` exactly (missing, unexpected, wrong shape)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(
            f"the weights in {where} do not match the model built from its config.json; "
            + "; ".join(problems)
            + ". Check that the config and the weights belong to the same checkpoint."
        )

"""Finding files: local diffusers folders and Hub repos (offline from the cache too), weight files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from stablepipe.loading.checkpoint import JSON_TYPE_NAMES, CheckpointError, check_zip_sizes, read_safetensors_state

# The keyword arguments of `from_pretrained` / `from_single_file` that go to the Hub download.
HUB_KWARGS = ("cache_dir", "local_files_only", "token", "force_download", "proxies")

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
            return shard_files(path)
        if path.is_file():
            return [path]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing (no such folder)"
    looked = f"looked for {', '.join(weight_candidates(base, variant))}; the folder has {present}"
    if variant:
        raise VariantNotFoundError(
            f"You are trying to load the model files of the `variant={variant}`, but there are none in {folder}: "
            f"{looked}; load without variant= to use the plain weights"
        )
    variants = sorted({p.name.split(".")[-2] for p in folder.glob(f"{base}.*.*") if ".index." not in p.name})
    hint = f"; it has weights of variant {variants}: pass variant={variants[0]!r}" if variants else ""
    # The first words are diffusers' (user code and its tests match them); the rest says what is there.
    raise FileNotFoundError(f"Error no file named {base}.bin found in directory {folder} (nor the others: {looked}){hint}")


class VariantNotFoundError(FileNotFoundError, ValueError):
    """No weights of the variant asked for (`variant="fp16"`): a missing file, and the ValueError diffusers raises
    for a pipeline none of whose components has the variant."""


def has_variant(folder: Path, variant: str) -> bool:
    """Whether a component folder holds weights of `variant` (`*.fp16.safetensors`, `*.safetensors.index.fp16.json`)."""
    return any(folder.glob(f"*.{variant}.*"))


def shard_files(index_path: Path) -> list[Path]:
    """The shard files a sharded-weights index names (`weight_map`: tensor name -> file in the same folder)."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} has no `weight_map` object of file names; fix it or download it again")
    shards = sorted(set(weight_map.values()))
    if outside := [s for s in shards if Path(s).name != s]:
        raise ValueError(f"{index_path} names shard {outside[0]!r} outside its folder; shards are file names only")
    return [index_path.parent / shard for shard in shards]


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object ({...}); errors name the file and where in it the problem is."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file (byte {err.start} is not UTF-8); fix it or download it again") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
            "fix the file or download it again"
        ) from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config; fix it or download it again") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} must hold a JSON object ({{\"key\": value, ...}}) but holds a JSON "
            f"{JSON_TYPE_NAMES.get(type(value), type(value).__name__)}; fix it or download it again"
        )
    return value


def load_state_dict(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read weights from safetensors or (safely, no code runs) from torch `.bin` / `.ckpt` files; with `dtype`,
    floating-point weights come converted to it."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                state.update(read_safetensors_state(path, dtype))
            except CheckpointError as err:  # names the file, the problem and what to do
                raise OSError(str(err)) from err
            except OSError as err:
                raise OSError(f"{path} is not a readable safetensors file ({err}); re-download it") from err
        else:
            try:
                check_zip_sizes(path)
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

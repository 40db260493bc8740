"""`ModelMixin`: config-driven torch modules that load and save diffusers' folder layout, strictly."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablepipe.configuration import ConfigMixin
from stablepipe.loading.dtypes import resolve_dtype
from stablepipe.loading.files import (
    WEIGHT_NAMES,
    check_state_dict,
    find_weight_files,
    is_local,
    load_state_dict,
    snapshot,
)


LAYERWISE_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                         nn.ConvTranspose3d)
LAYERWISE_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")  # diffusers' defaults


def _cast_hook(dtype: torch.dtype, non_blocking: bool):
    """A forward hook (pre or post) that casts its module's weights to `dtype`."""

    def hook(module: nn.Module, *_: Any) -> None:
        module.to(dtype, non_blocking=non_blocking)

    return hook


class ModelMixin(nn.Module, ConfigMixin):
    """A module built from `config.json` whose parameter names are diffusers' state-dict names."""

    config_name = "config.json"
    weights_name = WEIGHT_NAMES["diffusers"]
    _supports_gradient_checkpointing = False
    _keep_in_fp32_modules: list[str] | None = None  # modules (by name) that `from_pretrained` keeps in float32

    def __getattr__(self, name: str) -> Any:
        """Parameters, buffers and submodules as any module; then config values, with diffusers' FutureWarning."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            return ConfigMixin.__getattr__(self, name)

    # -- gradient checkpointing (diffusers' names) ------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in the backward pass instead of keeping them: less memory in training."""
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (with layerwise casting, not the storage dtype of its weights)."""
        return self.__dict__.get("_layerwise_compute_dtype") or next(self.parameters()).dtype

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype | None = None,
        skip_modules_pattern: tuple[str, ...] | None = None,
        skip_modules_classes: tuple[type, ...] | None = None,
        non_blocking: bool = False,
    ) -> None:
        """diffusers' layerwise casting: the weights of the linear and convolution layers are stored in
        `storage_dtype` (float8: a quarter of float32's memory) and each layer is cast to `compute_dtype` (the
        model's dtype by default) just for its own forward. Layers whose name matches a `skip_modules_pattern`
        regex (default: norms, positional and patch embeddings, proj_in / proj_out) or is a `skip_modules_classes`
        instance stay as they are."""
        compute_dtype = compute_dtype or self.dtype
        patterns = LAYERWISE_SKIP_PATTERNS if skip_modules_pattern is None else tuple(skip_modules_pattern)
        skip = tuple(skip_modules_classes or ())
        for name, module in self.named_modules():
            if not isinstance(module, LAYERWISE_CAST_LAYERS) or isinstance(module, skip):
                continue
            if any(re.search(pattern, name) for pattern in patterns):
                continue
            module.to(storage_dtype)
            module.register_forward_pre_hook(_cast_hook(compute_dtype, non_blocking))
            module.register_forward_hook(_cast_hook(storage_dtype, non_blocking))
        self.__dict__["_layerwise_compute_dtype"] = compute_dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        **hub_kwargs: Any,
    ):
        """Build from `config.json` and load the weights with a strict key and shape check."""
        torch_dtype = resolve_dtype(torch_dtype, hub_kwargs.pop("dtype", None))  # also a name: "float16"
        folder = Path(path_or_repo_id, subfolder or "")
        if not is_local(path_or_repo_id):
            prefix = f"{subfolder}/" if subfolder else ""
            root = snapshot(
                str(path_or_repo_id),
                allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors", f"{prefix}*.bin"],
                revision=revision,
                **hub_kwargs,
            )
            folder = root / (subfolder or "")
        config = cls.load_config(folder)
        files = find_weight_files(folder, cls.weights_name, variant)
        state = load_state_dict(files, torch_dtype)  # converted tensor by tensor: no second copy of the weights
        return cls.from_state_dict(config, state, where=str(files[0]), torch_dtype=torch_dtype)

    @classmethod
    def from_state_dict(
        cls,
        config: dict[str, Any],
        state: dict[str, torch.Tensor],
        *,
        where: str = "the state dict",
        torch_dtype: torch.dtype | None = None,
    ):
        """Build the model from `config` on the meta device, then take `state` as its weights (no copy)."""
        with torch.device("meta"):
            model = cls.from_config(config)
        check_state_dict(model, state, where=where)
        if torch_dtype is not None:
            state = {k: v.to(_load_dtype(cls, k, torch_dtype)) if v.is_floating_point() else v
                     for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        model.init_buffers()
        return model.eval()

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers after building on the meta device; override where needed."""

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
        **_: Any,
    ) -> Path:
        """Write `config.json` and the weights in diffusers' layout: one file, or shards of at most
        `max_shard_size` (bytes, or "5GB", "200MB") and their `.index.json`; returns the file or the index."""
        folder = Path(folder)
        self.save_config(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        return save_weights(state, folder, self.weights_name, variant=variant, safe=safe_serialization,
                            max_shard_size=parse_size(max_shard_size))


def checkpointed(owner: nn.Module, fn, *args: Any) -> Any:
    """`fn(*args)`; with `owner.gradient_checkpointing` on and gradients enabled its activations are recomputed
    in the backward pass instead of kept (Chen et al. 2016, "Training deep nets with sublinear memory cost")."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _load_dtype(cls: type, key: str, torch_dtype: torch.dtype) -> torch.dtype:
    """float32 for the tensors of `cls._keep_in_fp32_modules` (by module name), else `torch_dtype`."""
    keep = cls._keep_in_fp32_modules or ()
    return torch.float32 if any(name in key.split(".") for name in keep) else torch_dtype


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "10GB", "200MB", "5GiB"."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * SIZE_UNITS[unit])
    raise ValueError(f"max_shard_size {size!r} is not a size; give bytes (an int) or a string like '5GB' or '200MB'")


def shard_state(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in order, into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_weights(
    state: dict[str, torch.Tensor], folder: Path, base: str, *, variant: str | None, safe: bool, max_shard_size: int
) -> Path:
    """Write `state` as `base[.variant].safetensors` (or `.bin`), sharded with an index as diffusers names them
    (`base-00001-of-00002[.variant].safetensors`, `base.safetensors.index[.variant].json`) when it is larger."""
    from safetensors.torch import save_file

    ext = "safetensors" if safe else "bin"
    suffix = f".{variant}" if variant else ""
    shards = shard_state(state, max_shard_size)

    def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if safe:
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if len(shards) == 1:
        write(state, path := folder / f"{base}{suffix}.{ext}")
        return path
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{base}-{i:05d}-of-{len(shards):05d}{suffix}.{ext}"
        write(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = folder / f"{base}.{ext}.index{suffix}.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return index

"""`ModelMixin`: config-driven torch modules that load and save diffusers' folder layout, strictly."""

from __future__ import annotations

import os
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


class ModelMixin(nn.Module, ConfigMixin):
    """A module built from `config.json` whose parameter names are diffusers' state-dict names."""

    config_name = "config.json"
    weights_name = WEIGHT_NAMES["diffusers"]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

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
            state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        model.init_buffers()
        return model.eval()

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers after building on the meta device; override where needed."""

    def save_pretrained(
        self, folder: str | os.PathLike, *, variant: str | None = None, safe_serialization: bool = True
    ) -> Path:
        """Write `config.json` and the weights in diffusers' layout."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.save_config(folder)
        suffix = f".{variant}" if variant else ""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if safe_serialization:
            path = folder / f"{self.weights_name}{suffix}.safetensors"
            save_file(state, str(path), metadata={"format": "pt"})
        else:
            path = folder / f"{self.weights_name}{suffix}.bin"
            torch.save(state, path)
        return path

"""IP-Adapters (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): their files, their layers in
the UNet, and the pipeline methods diffusers' `IPAdapterMixin` gives (`load_ip_adapter`, `set_ip_adapter_scale`,
`unload_ip_adapter`).

A file holds two state dicts in the original (Tencent AI Lab) key names: "image_proj", the projection of CLIP
image features to tokens, and "ip_adapter", the image key / value projections of every cross-attention,
numbered `1, 3, 5, ...` in the order of diffusers' `attn_processors` (down, up, mid blocks; the even numbers
are the self-attentions). A `.safetensors` file prefixes its keys "image_proj." and "ip_adapter."; a `.bin`
file is the pickled dict {"image_proj": ..., "ip_adapter": ...}, read without running code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablepipe.models.attention import IPAdapterAttnProcessor2_0

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
StateDict = dict[str, torch.Tensor]

# ---- files ------------------------------------------------------------------------------------------------------


def read_ip_adapter_file(
    source: str | os.PathLike, *, subfolder: str | None, weight_name: str, hub_kwargs: dict[str, Any]
) -> dict[str, StateDict]:
    """{"image_proj": ..., "ip_adapter": ...} from `weight_name` in a folder (its `subfolder`) or a Hub repo."""
    from stablepipe.loading.checkpoint import load_pickle, read_checkpoint
    from stablepipe.loading.files import fetch_file

    revision = hub_kwargs.get("revision")
    rest = {k: v for k, v in hub_kwargs.items() if k != "revision"}
    path = Path(source) if Path(source).is_file() else fetch_file(
        source, weight_name, subfolder=subfolder, revision=revision, **rest
    )  # fmt: skip
    if path.suffix.lower() == ".safetensors":
        state = read_checkpoint(path).state
        parts: dict[str, StateDict] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            group, _, name = key.partition(".")
            if group in parts:
                parts[group][name] = value
        return check_ip_adapter_dict(parts, where=str(path))
    return check_ip_adapter_dict(load_pickle(path), where=str(path))


def check_ip_adapter_dict(state: Any, *, where: str) -> dict[str, StateDict]:
    """The file's two state dicts, or an error naming what is there instead."""
    if not isinstance(state, Mapping) or not all(isinstance(state.get(k), Mapping) and state.get(k) for k in
                                                 ("image_proj", "ip_adapter")):  # fmt: skip
        found = sorted(map(str, state))[:6] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{where} is not an IP-Adapter: it needs 'image_proj' and 'ip_adapter' weights (keys 'image_proj.*' and "
            f"'ip_adapter.*' in a .safetensors file), found {found}. Is it a LoRA (load_lora_weights) or an image "
            "encoder (image_encoder=)?"
        )
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


def load_image_encoder(source: str | os.PathLike, subfolder: str, *, dtype: torch.dtype, hub_kwargs: dict[str, Any]):
    """The CLIP vision model (with its projection) stored with the IP-Adapter, in `subfolder` of `source`."""
    from transformers import CLIPVisionModelWithProjection

    from stablepipe.loading.components import load_transformers_model
    from stablepipe.loading.files import is_local, snapshot

    if is_local(source):
        folder = Path(source, subfolder)
    else:
        folder = snapshot(str(source), allow_patterns=[f"{subfolder}/*"], **hub_kwargs) / subfolder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no image encoder at {folder} (no config.json): pass image_encoder_folder= naming the folder of the "
            "CLIP vision model, load the pipeline with image_encoder=..., or pass image_encoder_folder=None and "
            "give ip_adapter_image_embeds instead of ip_adapter_image"
        )
    return load_transformers_model(CLIPVisionModelWithProjection, folder, torch_dtype=dtype, variant=None)


# ---- scales ---------------------------------------------------------------------------------------------------


def block_scales(unet: nn.Module, scale: dict) -> dict[str, Any]:
    """A per-block scale, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}, as
    one value per transformer (by module name prefix), 0 where not given, as diffusers expands it (InstantStyle:
    up block 0's second transformer carries style, down block 2's second the layout)."""
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"IP-Adapter scale keys must be 'down', 'mid' and 'up', got {sorted(unknown)}")
    mid = scale.get("mid", 0.0)
    if isinstance(mid, list) and len(mid) != 1:
        raise ValueError(f"the mid block has one transformer: give one scale for 'mid', got {len(mid)}")
    scales = {"mid_block.attentions.0": mid[0] if isinstance(mid, list) else mid}
    per_block = {"down": unet.config.layers_per_block, "up": unet.config.layers_per_block + 1}
    for side in ("down", "up"):
        blocks = [i for i, block in enumerate(getattr(unet, f"{side}_blocks")) if hasattr(block, "attentions")]
        given = scale.get(side, 0.0)
        given = given if isinstance(given, dict) else {f"block_{i}": given for i in blocks}
        extra = set(given) - {f"block_{i}" for i in blocks}
        if extra:
            raise ValueError(f"IP-Adapter scale: {side} blocks {sorted(extra)} have no attention; those with "
                             f"attention are {[f'block_{i}' for i in blocks]}")  # fmt: skip
        for i in blocks:
            values = given.get(f"block_{i}", 0.0)
            values = values if isinstance(values, list) else [values]
            values = values * per_block[side] if len(values) == 1 else values
            if len(values) != per_block[side]:
                raise ValueError(f"IP-Adapter scale: {side}.block_{i} has {per_block[side]} transformers, "
                                 f"got {len(values)} scales")  # fmt: skip
            scales.update({f"{side}_blocks.{i}.attentions.{j}": value for j, value in enumerate(values)})
    return scales


def set_ip_adapter_scales(unet: nn.Module, scale: Any) -> None:
    """One scale per loaded adapter (one value for all): a float, or a per-block dict (`block_scales`)."""
    scales = scale if isinstance(scale, list) else [scale]
    processors = {n: p for n, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
    if not processors:
        raise ValueError("no IP-Adapter is loaded: call load_ip_adapter(...) first")
    count = len(next(iter(processors.values())).scale)
    if len(scales) not in (1, count):
        raise ValueError(f"got {len(scales)} IP-Adapter scales for {count} loaded adapters; give one per adapter")
    expanded = [block_scales(unet, s) if isinstance(s, dict) else s for s in scales] * (count // len(scales))
    for name, processor in processors.items():
        for i, value in enumerate(expanded):
            if not isinstance(value, dict):
                processor.scale[i] = value
                continue
            for prefix, block_value in value.items():
                if name.startswith(prefix):
                    processor.scale[i] = block_value


# ---- the pipeline methods -------------------------------------------------------------------------------------


def _as_list(value: Any, count: int | None = None) -> list:
    values = list(value) if isinstance(value, list) else [value]
    return values * count if count is not None and len(values) == 1 else values


class IPAdapterMixin:
    """diffusers' IP-Adapter methods for pipelines with a UNet, an `image_encoder` and a `feature_extractor`."""

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict | list,
        subfolder: str | list[str] | None,
        weight_name: str | list[str],
        image_encoder_folder: str | None = "image_encoder",
        **kwargs: Any,
    ) -> None:
        """Load one IP-Adapter, or several (lists of equal length; a single source or subfolder serves all): a
        folder or Hub repo with `subfolder/weight_name`, or the state dict itself. The CLIP image encoder is
        loaded from `image_encoder_folder` (inside `subfolder`, or a path from the repo root with a "/") unless
        the pipeline has one; None skips it (then give `ip_adapter_image_embeds`)."""
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        kwargs.pop("low_cpu_mem_usage", None)  # accepted as diffusers; the weights are small
        if kwargs:
            raise TypeError(f"load_ip_adapter got unknown arguments {sorted(kwargs)}")
        names = _as_list(weight_name)
        sources, folders = _as_list(pretrained_model_name_or_path_or_dict, len(names)), _as_list(subfolder, len(names))
        if not len(names) == len(sources) == len(folders):
            raise ValueError(f"got {len(sources)} sources, {len(folders)} subfolders and {len(names)} weight names; "
                             "give one each per IP-Adapter (or a single source / subfolder for all)")  # fmt: skip
        state_dicts = []
        for source, folder, name in zip(sources, folders, names):
            if isinstance(source, Mapping):
                state_dicts.append(check_ip_adapter_dict(source, where="the IP-Adapter state dict"))
            else:
                state_dicts.append(read_ip_adapter_file(source, subfolder=folder, weight_name=name,
                                                        hub_kwargs=hub_kwargs))  # fmt: skip
            self._add_image_encoder(source, folder, image_encoder_folder, hub_kwargs)
        if any("_lora." in key for state in state_dicts for key in state["ip_adapter"]):
            # FaceID's LoRAs go in first: LoRA loading reads the UNet's layers without IP-Adapter modules in it
            if getattr(self.unet, "encoder_hid_proj", None) is not None:
                self.unet._unload_ip_adapter_weights()
            self._load_face_id_loras(state_dicts)
        self.unet._load_ip_adapter_weights(state_dicts)

    def _add_image_encoder(self, source, subfolder, image_encoder_folder, hub_kwargs) -> None:
        """Load the image encoder if the pipeline has none, and a CLIP image processor for it if it has none."""
        if getattr(self, "image_encoder", None) is None and image_encoder_folder is not None:
            if isinstance(source, Mapping):
                raise ValueError("the image encoder cannot be loaded from a state dict: pass image_encoder_folder="
                                 "None (and ip_adapter_image_embeds), or build the pipeline with image_encoder=")
            inside = "/" not in image_encoder_folder  # a bare name is inside `subfolder`, a path is from the root
            folder = Path(subfolder or "", image_encoder_folder) if inside else Path(image_encoder_folder)
            encoder = load_image_encoder(source, folder.as_posix(), dtype=self.dtype, hub_kwargs=hub_kwargs)
            self.register_modules(image_encoder=encoder.to(self.device))
        elif getattr(self, "image_encoder", None) is None:
            warnings.warn("no image encoder was loaded (image_encoder_folder=None): give ip_adapter_image_embeds, "
                          "not ip_adapter_image", UserWarning, stacklevel=3)  # fmt: skip
        if getattr(self, "feature_extractor", None) is None:
            from transformers import CLIPImageProcessor

            size = self.image_encoder.config.image_size if self.image_encoder is not None else 224
            self.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))

    def _load_face_id_loras(self, state_dicts: list[dict[str, StateDict]]) -> None:
        """FaceID files carry LoRA weights for every attention layer (keys "{n}.to_q_lora.down.weight" ..., n
        counting all of them in `attn_processors` order): loaded as LoRA adapters "faceid_{i}" at weight 1."""
        names = list(self.unet.attn_processors)
        for i, state in enumerate(state_dicts):
            lora = {f"unet.{names[int(k.split('.')[0])]}.{k.split('.', 1)[1]}": v
                    for k, v in state["ip_adapter"].items() if "_lora." in k}  # fmt: skip
            if lora and f"faceid_{i}" not in self.get_list_adapters().get("unet", []):
                self.load_lora_weights(lora, adapter_name=f"faceid_{i}")
                self.set_adapters([f"faceid_{i}"], adapter_weights=[1.0])

    def set_ip_adapter_scale(self, scale: float | dict | list) -> None:
        """How strongly each loaded adapter's image counts: a float, a per-block dict ({"up": {"block_0":
        [0.0, 1.0, 0.0]}}: only those transformers, as InstantStyle), or a list of those, one per adapter."""
        set_ip_adapter_scales(self.unet, scale)

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapters and their image encoder; the feature extractor stays for the safety checker."""
        if getattr(self, "image_encoder", None) is not None:
            self.register_modules(image_encoder=None)
        if not hasattr(self, "safety_checker") and getattr(self, "feature_extractor", None) is not None:
            self.register_modules(feature_extractor=None)
        self.unet._unload_ip_adapter_weights()

"""Which kind of Stable Diffusion checkpoint a single file is, from its keys and shapes, and the shipped
configs (`configs/<type>.json`) for each kind. Nothing is downloaded.

SD 2.x 768 px models predict v, the 512 px base predicts epsilon, and both have the same tensors. As the
original training code and diffusers do, v-prediction is assumed unless the file says otherwise: a
`v_pred` marker tensor, ModelSpec metadata (`modelspec.prediction_type` or an `-v` architecture), or the
base model's `global_step` of 875000. `prediction_type=` always wins.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
FIRST_CROSS_ATTENTION = UNET_PREFIX + "input_blocks.{}.1.transformer_blocks.0.attn2.to_k.weight"
XL_BASE_TEXT = "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"
XL_REFINER_TEXT = "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"
NOISE_LEVEL_CLASSES = UNET_PREFIX + "label_emb.weight"
SD2_BASE_GLOBAL_STEP = 875000

# (family, UNet input channels) -> type: the variants differ in what is concatenated to the latents.
TYPES_BY_CHANNELS = {
    ("sd1", 4): "sd1", ("sd1", 9): "sd1-inpaint",
    ("sd2", 4): "sd2", ("sd2", 9): "sd2-inpaint", ("sd2", 5): "sd2-depth",
    ("sdxl", 4): "sdxl", ("sdxl", 9): "sdxl-inpaint", ("sdxl-refiner", 4): "sdxl-refiner",
    ("upscaler", 7): "sd-x4-upscaler",
}
CROSS_ATTENTION_FAMILY = {768: "sd1", 1024: "sd2"}


@dataclasses.dataclass(frozen=True)
class Detected:
    model_type: str  # a name of configs/<type>.json
    prediction_type: str  # "epsilon" or "v_prediction"


@functools.cache
def known_types() -> tuple[str, ...]:
    folder = resources.files("stablepipe.loading") / "configs"
    return tuple(sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")))


def type_config(model_type: str) -> dict[str, Any]:
    """The shipped description of one checkpoint type: pipeline class and every component's config."""
    if model_type not in known_types():
        raise ValueError(f"unknown checkpoint type {model_type!r}; stablepipe knows {', '.join(known_types())}")
    text = (resources.files("stablepipe.loading") / "configs" / f"{model_type}.json").read_text()
    return json.loads(text)


def cross_attention_dim(state: Mapping[str, torch.Tensor]) -> int | None:
    for block in range(1, 12):
        key = FIRST_CROSS_ATTENTION.format(block)
        if key in state:
            return int(state[key].shape[1])
    return None


def family(state: Mapping[str, torch.Tensor]) -> str | None:
    if XL_BASE_TEXT in state:
        return "sdxl"
    if XL_REFINER_TEXT in state:
        return "sdxl-refiner"
    if NOISE_LEVEL_CLASSES in state:
        return "upscaler"
    return CROSS_ATTENTION_FAMILY.get(cross_attention_dim(state))


def detect_model_type(
    state: Mapping[str, torch.Tensor],
    *,
    global_step: int | None = None,
    metadata: Mapping[str, str] | None = None,
    where: str = "the checkpoint",
) -> Detected:
    """The type of an original-layout checkpoint, or a ValueError that says how to load it anyway."""
    if CONV_IN not in state:
        hint = what_else_it_is(state)
        raise ValueError(f"{where} is not a full Stable Diffusion checkpoint (no {UNET_PREFIX}* weights){hint}")
    kind = family(state)
    channels = int(state[CONV_IN].shape[1])
    model_type = TYPES_BY_CHANNELS.get((kind, channels))
    if model_type is None:
        raise ValueError(
            f"{where} is not a checkpoint type stablepipe recognises (family {kind or 'unknown'}, UNet input "
            f"channels {channels}, cross-attention width {cross_attention_dim(state)}). Pass `config=` with a "
            "diffusers folder (or Hub repo id) of the same architecture to load it."
        )
    prediction = type_config(model_type)["prediction_type"]
    if model_type == "sd2":
        prediction = sd2_prediction_type(state, global_step=global_step, metadata=metadata or {})
    return Detected(model_type, prediction)


def sd2_prediction_type(
    state: Mapping[str, torch.Tensor], *, global_step: int | None, metadata: Mapping[str, str]
) -> str:
    """v-prediction for SD 2.x unless the file marks itself as epsilon (see the module docstring)."""
    if "v_pred" in state:
        return "v_prediction"
    declared = metadata.get("modelspec.prediction_type", "").lower()
    if declared in ("epsilon", "eps", "v", "v_prediction"):
        return "epsilon" if declared.startswith("eps") else "v_prediction"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2"):
        return "v_prediction" if architecture.endswith("-v") else "epsilon"
    return "epsilon" if global_step == SD2_BASE_GLOBAL_STEP else "v_prediction"


def what_else_it_is(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(".lora_" in k or "lora_down" in k or ".lora." in k for k in keys[:200]):
        return "; it looks like a LoRA: load it with `pipe.load_lora_weights(path)`"
    if any(k in state for k in ("string_to_param", "emb_params", "clip_l", "clip_g")) or len(keys) <= 2:
        return "; it looks like a textual-inversion embedding: load it with `pipe.load_textual_inversion(path)`"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "; it looks like a VAE on its own: load the model first, then its VAE with `vae=`"
    return ""

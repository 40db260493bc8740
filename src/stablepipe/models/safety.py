"""The Stable Diffusion 1.x safety checker: a CLIP vision tower scoring images against fixed NSFW concepts.

The rule (diffusers' `StableDiffusionSafetyChecker`, after CompVis' original release): project the pooled CLIP
image embedding, take its cosine similarity to 3 "special care" and 17 concept embeddings, subtract each
concept's threshold, and round to 3 decimals. An image with any special-care score above 0 gets every concept
score raised by 0.01; an image with any concept score above 0 is flagged and replaced by a black image.

Checkpoints hold it in the `safety_checker/` folder, as a transformers model (`CLIPConfig`). Loading goes
through transformers' `from_pretrained`, made strict here: a missing, unexpected or mis-shaped weight raises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

from stablepipe.image import numpy_to_pil, pt_to_numpy

SafetyImages = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]

NUM_CONCEPTS = 17  # concept_embeds rows in every released checkpoint
NUM_SPECIAL_CARE = 3  # special_care_embeds rows
SPECIAL_CARE_ADJUSTMENT = 0.01  # added to every concept score once a special-care concept fires


def cosine_similarity(embeds: torch.Tensor, concepts: torch.Tensor) -> np.ndarray:
    """(B, P) x (N, P) -> (B, N) cosine similarities, computed in the model's dtype, returned as float32."""
    unit_embeds = nn.functional.normalize(embeds)
    unit_concepts = nn.functional.normalize(concepts)
    return (unit_embeds @ unit_concepts.T).detach().cpu().float().numpy()


def concept_scores(similarity: np.ndarray, thresholds: torch.Tensor, adjustment: np.ndarray) -> np.ndarray:
    """Similarity minus threshold plus the per-image adjustment, rounded to 3 decimals, in float32 (B, N)."""
    limits = thresholds.detach().cpu().float().numpy()  # (N,)
    return np.round(similarity - limits + adjustment[:, None], 3)


def black_out(images: SafetyImages, flags: Sequence[bool]) -> SafetyImages:
    """Copy of `images` (a batch or a list) with image i all zeros where flags[i]; the input is untouched."""
    if isinstance(images, torch.Tensor):
        mask = torch.tensor(list(flags), dtype=torch.bool, device=images.device)
        return images.masked_fill(mask.view(-1, *[1] * (images.ndim - 1)), 0)
    if isinstance(images, np.ndarray):
        out = images.copy()
        out[np.asarray(flags, dtype=bool)] = 0
        return out
    return [_zeros_like(image) if flag else image for image, flag in zip(images, flags)]


def _zeros_like(image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    return torch.zeros_like(image) if isinstance(image, torch.Tensor) else np.zeros_like(image)


class StableDiffusionSafetyChecker(PreTrainedModel):
    """CLIP vision tower + projection + concept embeddings; `forward(clip_input, images) -> (images, flags)`.

    Weight files use diffusers' key names (`vision_model.vision_model.*`, `visual_projection.weight`,
    `concept_embeds`, `special_care_embeds`, `concept_embeds_weights`, `special_care_embeds_weights`); in memory
    transformers 5 names the tower `vision_model.*`, and its loader maps one to the other.
    """

    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        width, dim = config.vision_config.hidden_size, config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(width, dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(NUM_CONCEPTS, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(NUM_SPECIAL_CARE, dim), requires_grad=False)
        # Per-concept similarity thresholds.
        self.concept_embeds_weights = nn.Parameter(torch.ones(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(NUM_SPECIAL_CARE), requires_grad=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """transformers' `from_pretrained` (same arguments, `torch_dtype`/`dtype` too), with a strict check.

        Raises `ValueError` naming the keys when the weights miss any parameter, hold keys the model does not
        have, or hold a tensor of the wrong shape (transformers itself would warn and initialise missing ones
        randomly). `ignore_mismatched_sizes=True` lets wrong shapes through (re-initialised, as transformers
        does); `output_loading_info=True` still returns `(model, info)`. Both key layouts load: the released
        `vision_model.vision_model.*` and transformers 5's flattened `vision_model.*`.
        """
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers would raise on a wrong shape with a pointer to its log; collect it to name it below.
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        location = Path(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        check_loading_info(info, cls.__name__, location, allow_mismatch=allow_mismatch)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """transformers' `save_pretrained`, always writing the released checkpoints' key names.

        transformers 5 flattens `CLIPVisionModel` and, for a model not loaded from a file, would save
        `vision_model.embeddings.*`; the SD 1.x folders (and transformers 4) have `vision_model.vision_model.*`.
        """
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = released_key_names(self.state_dict())
        kwargs["save_original_format"] = False  # the names above are final: no renaming back by transformers
        super().save_pretrained(save_directory, **kwargs)

    def embed_images(self, clip_input: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values (B, 3, S, S) -> projected image embeddings (B, projection_dim)."""
        pooled = self.vision_model(pixel_values=clip_input).pooler_output  # (B, hidden)
        return self.visual_projection(pooled)

    def nsfw_flags(self, image_embeds: torch.Tensor) -> list[bool]:
        """One flag per image: does any concept score exceed 0 (after the special-care adjustment)?"""
        no_adjustment = np.zeros(len(image_embeds), dtype=np.float32)
        special = concept_scores(
            cosine_similarity(image_embeds, self.special_care_embeds),
            self.special_care_embeds_weights,
            no_adjustment,
        )  # (B, 3)
        # diffusers also adds the adjustment to the special-care scores after the first that fires; only
        # whether any fired matters, so that changes nothing.
        fired = (special > 0).any(axis=1)  # (B,)
        adjustment = np.where(fired, SPECIAL_CARE_ADJUSTMENT, 0).astype(np.float32)  # (B,)
        scores = concept_scores(
            cosine_similarity(image_embeds, self.concept_embeds), self.concept_embeds_weights, adjustment
        )  # (B, 17)
        return (scores > 0).any(axis=1).tolist()

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images: SafetyImages) -> tuple[SafetyImages, list[bool]]:
        """Flag each image and return (images with flagged ones black, flags); `images` is left unmodified."""
        flags = self.nsfw_flags(self.embed_images(clip_input))
        if any(flags):
            logging.getLogger(__name__).warning(
                "Potential NSFW content was detected in one or more images. A black image will be returned "
                "instead. Try again with a different prompt and/or seed."
            )
        return black_out(images, flags), flags


def released_key_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers 5's flattened `vision_model.X` to the checkpoints' `vision_model.vision_model.X`."""
    nested = "vision_model.vision_model."
    return {
        f"vision_model.{key}" if key.startswith("vision_model.") and not key.startswith(nested) else key: value
        for key, value in state_dict.items()
    }


def check_loading_info(
    info: dict[str, Any], class_name: str, location: str | os.PathLike, *, allow_mismatch: bool = False
) -> None:
    """Raise `ValueError` if transformers' loading info reports missing, unexpected or mis-shaped weights.

    `info` is what `PreTrainedModel.from_pretrained(..., output_loading_info=True)` returns second.
    """
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys {sorted(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys") and not allow_mismatch:
        mismatched = info["mismatched_keys"]
        shapes = [f"{key} (file {tuple(got)}, model {tuple(want)})" for key, got, want in mismatched]
        problems.append(f"wrong shapes {sorted(shapes)}")
    if info.get("error_msgs"):
        problems.append(f"errors {list(info['error_msgs'])}")
    if problems:
        raise ValueError(
            f"Could not load {class_name} from {os.fspath(location)}: " + "; ".join(problems) + ". Expected "
            "diffusers' safety_checker layout (config.json from CLIPConfig; weights "
            "vision_model.vision_model.*, visual_projection.weight, concept_embeds, special_care_embeds, "
            "concept_embeds_weights, special_care_embeds_weights) with shapes matching config.json."
        )


def run_safety_checker(
    checker: Callable[..., tuple[torch.Tensor, list[bool]]] | None,
    feature_extractor: Callable[..., Any] | None,
    images: torch.Tensor,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, list[bool] | None]:
    """The pipelines' safety stage: decoded images in [0, 1] (B, C, H, W) -> (images, flags).

    The feature extractor (a `CLIPImageProcessor`) sees the images as uint8 PIL images, as in diffusers'
    pipelines; flagged images come back all zeros (black). Without a checker: `(images, None)`.
    """
    if checker is None:
        return images, None
    if feature_extractor is None:
        raise ValueError(
            "A safety_checker needs a feature_extractor (CLIPImageProcessor) to prepare its input; pass one, "
            "or pass safety_checker=None to disable the check."
        )
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"run_safety_checker expects a (B, C, H, W) tensor with values in [0, 1], got {got}")
    pil_images = numpy_to_pil(pt_to_numpy(images))
    clip_input = feature_extractor(pil_images, return_tensors="pt").pixel_values  # (B, 3, S, S)
    return checker(clip_input=clip_input.to(device=device, dtype=dtype), images=images)

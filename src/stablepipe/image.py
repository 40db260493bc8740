"""Conversions between PIL images, numpy arrays and tensors, the way diffusers' image processor does them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image | np.ndarray | torch.Tensor]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return (images / 2 + 0.5).clamp(0, 1)


def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) tensor -> (B, H, W, C) float32 array."""
    return images.detach().cpu().permute(0, 2, 3, 1).float().numpy()


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, C) array in [0, 1] -> PIL images (uint8, rounded)."""
    if images.ndim == 3:
        images = images[None]
    pixels = (images * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p.squeeze(-1), mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


def postprocess(
    images: torch.Tensor, output_type: str = "pil", *, do_denormalize: Sequence[bool] | None = None
) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
    """Decoded images in [-1, 1] (B, C, H, W) -> the requested output type.

    `do_denormalize[i] = False` keeps image i as is (the safety checker's black images stay black).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return images
    flags = [True] * images.shape[0] if do_denormalize is None else list(do_denormalize)
    images = torch.stack([denormalize(x) if flag else x for x, flag in zip(images, flags)])
    if output_type == "pt":
        return images
    array = pt_to_numpy(images)
    return array if output_type == "np" else numpy_to_pil(array)

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


# ---- inputs: whatever image the user gives, in one of two canonical forms ------------------------------

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit PNGs open as these


def pil_to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit (or 32-bit integer) PIL image scaled to 8-bit "L" (0..65535 -> 0..255); others unchanged."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    pixels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 / 255 = 257
    return PIL.Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8), mode="L")


def pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB: grayscale repeated, alpha dropped (as `load_image` does), 16-bit scaled."""
    image = pil_to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_unit_float(pixels: np.ndarray | torch.Tensor, *, name: str = "image") -> np.ndarray | torch.Tensor:
    """Pixel values as float32 in [0, 1]: uint8 / 255, uint16 / 65535, bool as 0/1; floats kept as they are."""
    dtype_name = str(pixels.dtype).replace("torch.", "")
    if dtype_name in ("uint8", "uint16", "bool"):
        scale = {"uint8": 255.0, "uint16": 65535.0, "bool": 1.0}[dtype_name]
        pixels = pixels.astype(np.float32) if isinstance(pixels, np.ndarray) else pixels.float()
        return pixels / scale
    if dtype_name.startswith(("float", "bfloat")):
        return pixels.astype(np.float32) if isinstance(pixels, np.ndarray) else pixels
    raise TypeError(
        f"{name} has dtype {dtype_name}; give floats in [0, 1], or uint8 (0..255) or uint16 (0..65535) pixels"
    )


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, channels, H, W) for channels 1 or 3: gray repeated to RGB, alpha dropped,
    RGB to gray with ITU-R BT.601 luma weights (as PIL's "L" conversion)."""
    if images.shape[1] in (2, 4):  # gray + alpha, RGB + alpha
        images = images[:, :-1]
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights[None, :, None, None]).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot make a {channels}-channel image from {images.shape[1]} channels")


def pil_to_pt(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """PIL images of one size and mode -> (B, C, H, W) float32 in [0, 1] (C = 1 for "L")."""
    arrays = [np.asarray(image).astype(np.float32) / 255.0 for image in images]
    stacked = np.stack(arrays)  # (B, H, W) or (B, H, W, C)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return torch.from_numpy(stacked.transpose(0, 3, 1, 2).copy())

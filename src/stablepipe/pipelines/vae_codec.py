"""The VAE between pixels and diffusion latents, for every pipeline, read from the VAE's config.

The diffusion model sees z' = (z - shift_factor) * scaling_factor (Rombach et al. 2022, Sec. 4.3.2, the
"rescaled" latents; SD3 adds the shift), or, where the config has per-channel `latents_mean` / `latents_std`,
z' = (z - mean) * scaling_factor / std. `encode_images` goes pixels -> z', `decode_latents` z' -> pixels.

`upcast=True` runs the VAE in float32 where it is float16 and its config says that overflows (`force_upcast`, the
SDXL VAE's): the SDXL pipelines ask for it, as diffusers' do; the SD 1/2 ones do not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from stablepipe.pipelines import arguments
from stablepipe.random import Generator, randn_tensor


def scale_factor(vae) -> int:
    """Pixels per latent along each side: 2 ** (number of down blocks - 1), 8 for SD's VAEs."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def needs_upcast(vae) -> bool:
    """A float16 VAE whose config says float16 overflows in it (`force_upcast`)."""
    return vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))


@contextlib.contextmanager
def upcast_if_forced(vae, *, enabled: bool = True) -> Iterator[None]:
    """Run `vae` in float32 inside the block where it `needs_upcast` (and `enabled`), then cast it back."""
    if not (enabled and needs_upcast(vae)):
        yield
        return
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(dtype)


def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The config's per-channel `latents_mean` and `latents_std` (1, C, 1, 1), like `like`; None where unset."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None
    options = dict(dtype=like.dtype, device=like.device)
    return torch.tensor(mean, **options).view(1, -1, 1, 1), torch.tensor(std, **options).view(1, -1, 1, 1)


def to_diffusion_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The VAE's latents z (B, C, h, w) -> what the diffusion model sees (module docstring)."""
    stats, scale = latent_statistics(vae, z), vae.config.scaling_factor
    if stats is not None:
        return (z - stats[0]) * scale / stats[1]
    shift = vae.config.get("shift_factor")
    return (z - shift) * scale if shift is not None else z * scale


def from_diffusion_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_diffusion_latents`."""
    stats, scale = latent_statistics(vae, latents), vae.config.scaling_factor
    if stats is not None:
        return latents * stats[1] / scale + stats[0]
    shift = vae.config.get("shift_factor")
    return latents / scale + shift if shift is not None else latents / scale


# ---- encode ----------------------------------------------------------------------------------------------------


def sample_latents(encoded, generator: torch.Generator | None, *, sample_mode: str = "sample") -> torch.Tensor:
    """Latents from a VAE encoder output: a sample of its distribution, its mode ("argmax"), or `.latents`."""
    dist = getattr(encoded, "latent_dist", None)
    if dist is not None and sample_mode == "sample":
        return dist.sample(generator)
    if dist is not None and sample_mode == "argmax":
        return dist.mode()
    if hasattr(encoded, "latents"):
        return encoded.latents
    raise ValueError(f"cannot get latents from {type(encoded).__name__} (sample_mode={sample_mode!r})")


def encode_images(vae, images: torch.Tensor, *, generator: Generator, sample_mode: str = "sample") -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> diffusion latents (B, C, H/8, W/8) in the images' dtype. With a list of
    generators, image i is sampled with generator i (diffusers' order). The VAE runs in its own dtype (float32 for
    float16 images inside `upcast_if_forced`)."""
    dtype, images = images.dtype, images.to(vae.dtype)
    if isinstance(generator, list):
        parts = [sample_latents(vae.encode(images[i : i + 1]), generator[i], sample_mode=sample_mode)
                 for i in range(images.shape[0])]  # fmt: skip
        z = torch.cat(parts)  # (B, C, h, w)
    else:
        z = sample_latents(vae.encode(images), generator, sample_mode=sample_mode)
    return to_diffusion_latents(vae, z).to(dtype)


def skip_encoder_sample(vae, images: torch.Tensor, *, generator: Generator, scale: int) -> None:
    """Advance the generator(s) exactly as `encode_images` would, without running the encoder: for results
    that diffusers computes and never uses (a 4-channel inpainting UNet's masked-image latents)."""
    shape = (1, vae.config.latent_channels, images.shape[2] // scale, images.shape[3] // scale)
    dtype, device = vae.dtype, images.device
    if isinstance(generator, list):
        for i in range(images.shape[0]):
            randn_tensor(shape, generator=generator[i], device=device, dtype=dtype)
    elif generator is not None:
        randn_tensor((images.shape[0], *shape[1:]), generator=generator, device=device, dtype=dtype)


# ---- decode ----------------------------------------------------------------------------------------------------


def decode_latents(vae, latents: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Diffusion latents (B, C, h, w) -> images in [-1, 1] (B, 3, 8h, 8w) (LDM3D's VAE: RGB + depth channels).
    `upcast`: in float32 where the config says `force_upcast`. NaN or infinite output raises
    NonFiniteResultError, with what to do."""
    with upcast_if_forced(vae, enabled=upcast):
        z = from_diffusion_latents(vae, latents.to(vae.dtype))
        images = vae.decode(z, return_dict=False)[0]  # (B, 3, H, W)
    check_finite_images(images, vae, upcast=upcast)
    return images


def check_finite_images(images: torch.Tensor, vae, *, upcast: bool = False) -> None:
    """The VAE decoded no NaN or inf (float16 overflows in some VAEs): raise NonFiniteResultError if it did."""
    advice = arguments.precision_advice(vae.dtype, "the VAE", "check the VAE's weights")
    if upcast and vae.dtype == torch.float16:
        advice = (
            f"float16 overflowed in the VAE (force_upcast={vae.config.get('force_upcast')}): keep "
            "vae.config.force_upcast=True, run the VAE in float32 (pipe.vae.to(torch.float32)), use "
            "torch_dtype=torch.bfloat16, or a float16-safe VAE such as madebyollin/sdxl-vae-fp16-fix"
        )
    arguments.check_finite_result(images, stage="the VAE decoder", advice=advice)

"""The stages only Stable Diffusion XL needs, written once for its three pipelines.

- Micro-conditioning: original size, crop and target size (or aesthetic score, for the refiner) as
  `time_ids` (SDXL, Sec. 2.2 and 2.5).
- The base -> refiner hand-over: `denoising_end` cuts the base's schedule, `denoising_start` starts the
  refiner's at the same training timestep (the "ensemble of expert denoisers" of eDiff-I, Balaji et al. 2022).

Its two text encoders are data (`text.SDXL_TEXT_ENCODERS`); its float32 VAE is `vae_codec`'s `upcast`.
"""

from __future__ import annotations

import dataclasses

import torch

from stablepipe.pipelines import image_stages, vae_codec
from stablepipe.pipelines.text import PromptEmbeds

# ---- micro-conditioning -------------------------------------------------------------------------------------


@dataclasses.dataclass
class MicroConditioning:
    """What SDXL was told about each training image (SDXL, Sec. 2.2): its original size, the top-left corner
    of the crop, the target size; the refiner takes an aesthetic score instead of the target size (Sec. 2.5).
    Sizes are (height, width); None means the size of the image being made."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def text_to_image_ids(self, height: int, width: int) -> tuple[list[float], list[float]]:
        """(ids, negative ids) as the text-to-image pipeline builds them: the negative ones only when both
        negative sizes are given, else the same as the positive ones."""
        original, target = self.original_size or (height, width), self.target_size or (height, width)
        ids = [*original, *self.crops_coords_top_left, *target]
        if self.negative_original_size is None or self.negative_target_size is None:
            return ids, ids
        return ids, [*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size]

    def image_to_image_ids(self, height: int, width: int, *, aesthetic: bool) -> tuple[list[float], list[float]]:
        """(ids, negative ids) as img2img and inpainting build them; negative sizes default to the positive ones."""
        original, target = self.original_size or (height, width), self.target_size or (height, width)
        negative_original = self.negative_original_size or original
        if aesthetic:
            return ([*original, *self.crops_coords_top_left, self.aesthetic_score],
                    [*negative_original, *self.negative_crops_coords_top_left, self.negative_aesthetic_score])
        negative_target = self.negative_target_size or target
        # diffusers' img2img gives the negative ids the positive crop here; kept for the same images
        crop = self.crops_coords_top_left
        return [*original, *crop, *target], [*negative_original, *crop, *negative_target]


def check_time_ids(
    unet, num_ids: int, projection_dim: int | None, *, requires_aesthetics_score: bool | None = None
) -> None:
    """The UNet is an SDXL one, and its add_embedding takes `addition_time_embed_dim` features per id plus the
    pooled text embedding (`projection_dim`; None: not known yet, not checked)."""
    step = unet.config.addition_time_embed_dim
    if unet.config.get("addition_embed_type") != "text_time" or step is None:
        raise ValueError(
            "this UNet has no SDXL micro-conditioning (addition_embed_type='text_time'): it is not an SDXL "
            "checkpoint; load it with StableDiffusionPipeline (or its img2img / inpaint pipelines) instead"
        )
    if projection_dim is None:
        return
    expected, passed = unet.add_embedding.linear_1.in_features, step * num_ids + projection_dim
    if expected == passed:
        return
    hint = "check unet's addition_time_embed_dim and text_encoder_2's projection_dim"
    if requires_aesthetics_score is not None and abs(expected - passed) == step:
        hint = (
            "this UNet is an SDXL refiner: load it with requires_aesthetics_score=True"
            if expected < passed else "this UNet is an SDXL base model: load it with requires_aesthetics_score=False"
        )
    raise ValueError(
        f"the UNet's add_embedding takes {expected} features but {num_ids} time ids x {step} + {projection_dim} "
        f"pooled = {passed} were built; {hint}"
    )


def added_cond_kwargs(
    pooled: PromptEmbeds, ids: list[float], negative_ids: list[float], *, batch: int, repeat_pairs: bool = False
) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs` for `batch` images: pooled `text_embeds` (B', P) and `time_ids` (B', k),
    with guidance B' = 2 * batch, negatives first.

    `repeat_pairs`: diffusers' text-to-image repeats the (negative, positive) pair of id rows `batch` times, so
    rows alternate; that only matters with negative sizes and more than one image, and is kept for parity."""
    dtype, device = pooled.prompt_embeds.dtype, pooled.prompt_embeds.device
    row = torch.tensor([ids], dtype=dtype, device=device)  # (1, k)
    negative_row = torch.tensor([negative_ids], dtype=dtype, device=device)  # (1, k)
    if pooled.negative_pooled_prompt_embeds is None:
        return {"text_embeds": pooled.pooled_prompt_embeds, "time_ids": row.repeat(batch, 1)}
    text_embeds = torch.cat([pooled.negative_pooled_prompt_embeds, pooled.pooled_prompt_embeds])  # (2B, P)
    if repeat_pairs:
        time_ids = torch.cat([negative_row, row]).repeat(batch, 1)  # (2B, k)
    else:
        time_ids = torch.cat([negative_row.repeat(batch, 1), row.repeat(batch, 1)])  # (2B, k)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


# ---- base -> refiner timestep cuts ----------------------------------------------------------------------------


def is_fraction(value) -> bool:
    """denoising_start / denoising_end take effect only as a float strictly between 0 and 1, as in diffusers."""
    return isinstance(value, float) and 0 < value < 1


def check_denoising_fractions(denoising_start: float | None, denoising_end: float | None) -> None:
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not (isinstance(value, float) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a float between 0 and 1 (e.g. 0.8), got {value!r}")
    if is_fraction(denoising_start) and is_fraction(denoising_end) and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be smaller than denoising_end ({denoising_end})")


def cutoff_timestep(scheduler, fraction: float) -> int:
    """The training timestep at which `fraction` of the denoising is done: T - round(fraction * T)."""
    total = scheduler.config.num_train_timesteps
    return int(round(total - fraction * total))


def cut_at_denoising_end(
    scheduler, timesteps: torch.Tensor, num_inference_steps: int, denoising_end: float | None
) -> tuple[torch.Tensor, int]:
    """Keep the timesteps at or above the `denoising_end` cutoff (the base model's share); unchanged otherwise."""
    if not is_fraction(denoising_end):
        return timesteps, num_inference_steps
    kept = int((timesteps >= cutoff_timestep(scheduler, denoising_end)).sum())
    return timesteps[:kept], kept


def set_begin_index(scheduler, index: int) -> None:
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)


def image_timesteps(
    scheduler, num_inference_steps: int, *, strength: float, denoising_start: float | None
) -> tuple[torch.Tensor, int]:
    """The timesteps an image-to-image run denoises over: from `denoising_start` when it is a fraction (the
    refiner's share of the base's schedule; `strength` is then ignored), else the last `strength` of them."""
    if is_fraction(denoising_start):
        return start_at_denoising_start(scheduler, denoising_start)
    return image_stages.strength_timesteps(scheduler, num_inference_steps, strength)


def start_at_denoising_start(scheduler, denoising_start: float) -> tuple[torch.Tensor, int]:
    """The scheduler's timesteps below the `denoising_start` cutoff (the refiner's share) and their count."""
    count = int((scheduler.timesteps < cutoff_timestep(scheduler, denoising_start)).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1  # second-order steps come in pairs (all but the first timestep twice): start on a whole step
    start = len(scheduler.timesteps) - count
    set_begin_index(scheduler, start)
    return scheduler.timesteps[start:], count


# ---- the image's latents -----------------------------------------------------------------------------------------


def image_latents(
    vae, image: torch.Tensor, batch_size: int, *, generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """img2img's clean latents (batch_size, C, h, w), encoded in float32 where the VAE's config says so
    (`force_upcast`, as diffusers' SDXL pipelines do); latents given as `image` pass through."""
    with vae_codec.upcast_if_forced(vae):
        return image_stages.image_latents_for_batch(vae, image, batch_size, generator=generator, dtype=dtype,
                                                    device=device)  # fmt: skip


def check_given_latents(latents: torch.Tensor, image: torch.Tensor, batch_size: int, scale: int) -> None:
    """img2img's given starting `latents` fit the image: (batch_size, C, h, w) with h, w the image's latent size
    (`image` is preprocessed: pixels (B, 3, H, W), or latents, whose size is the latent size)."""
    channels = image.shape[1] if image.shape[1] != 3 else latents.shape[1]
    size = tuple(image.shape[-2:]) if image.shape[1] != 3 else (image.shape[2] // scale, image.shape[3] // scale)
    expected = (batch_size, channels, *size)
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"`latents` has shape {tuple(latents.shape)}, expected {expected} for this image and batch; leave "
            "latents unset to start from the image, or give latents of the image's latent size"
        )

"""The stages only Stable Diffusion XL needs, written once for its three pipelines.

- Two text encoders: their penultimate hidden states concatenated on the feature axis, and the pooled,
  projected embedding of the second (Podell et al. 2023, "SDXL", Sec. 2.1).
- Micro-conditioning: original size, crop and target size (or aesthetic score, for the refiner) as
  `time_ids` (SDXL, Sec. 2.2 and 2.5).
- The base -> refiner hand-over: `denoising_end` cuts the base's schedule, `denoising_start` starts the
  refiner's at the same training timestep (the "ensemble of expert denoisers" of eDiff-I, Balaji et al. 2022).
- The VAE in float32 when its config says float16 overflows (`force_upcast`), and NaN output refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from stablepipe.pipelines import arguments, image_stages, stages
from stablepipe.pipelines.stages import Prompt

# ---- prompts ------------------------------------------------------------------------------------------


def as_prompt_list(prompt: Prompt, batch_size: int, *, name: str) -> list[str]:
    """A string for every prompt, or one per prompt, as a list of `batch_size` strings."""
    if isinstance(prompt, str):
        return [prompt] * batch_size
    if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"`{name}` must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) != batch_size:
        raise ValueError(
            f"got {len(prompt)} entries in `{name}` for {batch_size} prompts; give one per prompt or a single string"
        )
    return prompt


def check_prompts(
    prompt: Prompt,
    prompt_2: Prompt,
    negative_prompt: Prompt,
    negative_prompt_2: Prompt,
    embeds: Sequence[torch.Tensor | None],
) -> int:
    """Check the prompts against `embeds` = (prompt, negative, pooled, negative pooled); return the batch size."""
    prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
    batch_size = stages.prompt_batch_size(prompt, prompt_embeds)
    stages.check_negative_prompt(prompt, negative_prompt, batch_size, negative_embeds)
    if prompt_2 is not None and prompt_embeds is not None:
        raise ValueError("pass either `prompt_2` or `prompt_embeds`, not both")
    if negative_prompt_2 is not None and negative_embeds is not None:
        raise ValueError("pass either `negative_prompt_2` or `negative_prompt_embeds`, not both")
    for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
        if value is not None:
            as_prompt_list(value, batch_size, name=name)
    if prompt_embeds is not None and pooled is None:
        raise ValueError("with `prompt_embeds` pass `pooled_prompt_embeds` too, from the same (second) text encoder")
    if negative_embeds is not None and negative_pooled is None:
        raise ValueError("with `negative_prompt_embeds` pass `negative_pooled_prompt_embeds` too")
    if prompt_embeds is not None and negative_embeds is not None and prompt_embeds.shape != negative_embeds.shape:
        raise ValueError(
            f"negative_prompt_embeds {tuple(negative_embeds.shape)} and prompt_embeds {tuple(prompt_embeds.shape)} "
            "must have the same shape"
        )
    return batch_size


# ---- text encoders ---------------------------------------------------------------------------------------


def hidden_and_pooled(
    tokenizer, text_encoder, prompts: list[str], *, layer: int, max_length: int | None = None,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's hidden states from `layer` (B, L, D), with no final layer norm, and its pooled projection
    (B, P) when it is a CLIPTextModelWithProjection (else None).

    With `chunks`, the prompts are read in AUTOMATIC1111's syntax and encoded in at least that many 77-token
    chunks (L = 77 * chunks; see prompt_weighting.py); the pooled projection is the first chunk's."""
    if chunks is not None:
        from stablepipe.pipelines.prompt_weighting import encode_weighted

        hidden, pooled = encode_weighted(
            tokenizer, text_encoder, prompts, device=text_encoder.device, layer=layer, min_chunks=chunks
        )
        return hidden, pooled if hasattr(text_encoder, "text_projection") else None
    tokens = stages.tokenize(tokenizer, prompts, max_length=max_length)
    out = text_encoder(tokens.input_ids.to(text_encoder.device), output_hidden_states=True)
    pooled = out[0] if out[0].ndim == 2 else None  # text_embeds come first only with the projection head
    return out.hidden_states[layer], pooled


def encode_with_encoders(
    encoders: Sequence[tuple], prompts: Sequence[list[str]], *, layer: int, max_length: int | None = None,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each (tokenizer, text_encoder) pair encodes its list of prompts; hidden states are concatenated on the
    feature axis (B, L, D1 + D2); the pooled embedding is the first one an encoder gives (B, P).

    With a single encoder (the refiner) only the first prompt list is used, as in diffusers."""
    states, pooled = [], None
    for (tokenizer, text_encoder), texts in zip(encoders, prompts):
        hidden, own_pooled = hidden_and_pooled(
            tokenizer, text_encoder, texts, layer=layer, max_length=max_length, chunks=chunks
        )
        states.append(hidden)
        pooled = own_pooled if pooled is None else pooled
    return torch.cat(states, dim=-1), pooled


@dataclasses.dataclass
class PromptEmbeds:
    """SDXL's four prompt tensors; the negative ones are None without guidance."""

    prompt_embeds: torch.Tensor  # (B, L, D1 + D2)
    negative_prompt_embeds: torch.Tensor | None  # (B, L, D1 + D2)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    negative_pooled_prompt_embeds: torch.Tensor | None  # (B, P)

    def as_tuple(self) -> tuple:
        return (self.prompt_embeds, self.negative_prompt_embeds, self.pooled_prompt_embeds,
                self.negative_pooled_prompt_embeds)

    def prepared(self, *, device: torch.device, dtype: torch.dtype, num_images_per_prompt: int) -> PromptEmbeds:
        """On `device` in `dtype`, each prompt's copies next to each other: (B * n, ...)."""
        def fit(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return stages.repeat_per_image(x.to(device=device, dtype=dtype), num_images_per_prompt)

        return PromptEmbeds(*(fit(x) for x in self.as_tuple()))


def encode_prompt(
    encoders: Sequence[tuple],
    prompt: Prompt,
    prompt_2: Prompt = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    negative_prompt: Prompt = None,
    negative_prompt_2: Prompt = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    force_zeros_for_empty_prompt: bool = True,
    prompt_weighting: bool = False,
) -> PromptEmbeds:
    """SDXL's prompt embeddings from `encoders` = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)].

    `prompt_2` goes to the second encoder (default: `prompt`); `clip_skip=k` takes the layer k before the
    penultimate. Without a negative prompt and with `force_zeros_for_empty_prompt`, the negatives are zeros.
    `prompt_weighting=True` reads AUTOMATIC1111's `(word:1.3)` syntax and encodes long prompts in 77-token
    chunks, each encoder on its own (as AUTOMATIC1111 does for SDXL), all prompts padded to one chunk count.
    """
    given = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
    batch_size = check_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, given)
    negatives = None  # the negative prompts to encode, per encoder
    if do_classifier_free_guidance and negative_prompt_embeds is None:
        negatives = negative_texts(negative_prompt, negative_prompt_2, batch_size, force_zeros_for_empty_prompt)
    texts = None
    if prompt_embeds is None:
        texts = [as_prompt_list(prompt, batch_size, name="prompt"),
                 as_prompt_list(prompt_2 or prompt, batch_size, name="prompt_2")]
    chunks = None
    if prompt_weighting:
        chunks = weighted_chunk_count(encoders, texts, negatives, prompt_embeds)
    if texts is not None:
        layer = -2 if clip_skip is None else -(clip_skip + 2)  # SDXL counts from the penultimate layer
        prompt_embeds, pooled = encode_with_encoders(encoders, texts, layer=layer, chunks=chunks)
        pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
    embeds = PromptEmbeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
    if not do_classifier_free_guidance:
        embeds.negative_prompt_embeds = embeds.negative_pooled_prompt_embeds = None
    elif negative_prompt_embeds is None:
        encode_negative_prompt(encoders, negatives, embeds, chunks=chunks)
    return embeds.prepared(device=device, dtype=dtype, num_images_per_prompt=num_images_per_prompt)


def negative_texts(
    negative_prompt: Prompt, negative_prompt_2: Prompt, batch_size: int, force_zeros: bool
) -> list[list[str]] | None:
    """The negative prompts for the two encoders; None where they are zeros (no negative prompt and
    `force_zeros_for_empty_prompt`, which SDXL base's model_index.json sets)."""
    if negative_prompt is None and force_zeros:
        return None
    return [as_prompt_list(negative_prompt or "", batch_size, name="negative_prompt"),
            as_prompt_list(negative_prompt_2 or negative_prompt or "", batch_size, name="negative_prompt_2")]


def weighted_chunk_count(
    encoders: Sequence[tuple], texts: list[list[str]] | None, negatives: list[list[str]] | None,
    prompt_embeds: torch.Tensor | None,
) -> int:
    """How many 77-token chunks every prompt and negative prompt is encoded in, so that their embeddings line up:
    the most any of them needs, or as many as the given `prompt_embeds` hold."""
    from stablepipe.pipelines.prompt_weighting import chunk_count, chunks_in

    if prompt_embeds is not None:
        return chunks_in(prompt_embeds, encoders[0][0])
    lists = [[*texts[i], *(negatives[i] if negatives else [])] for i in range(len(encoders))]
    return max(chunk_count(tokenizer, prompts) for (tokenizer, _), prompts in zip(encoders, lists))


def encode_negative_prompt(
    encoders: Sequence[tuple], negatives: list[list[str]] | None, embeds: PromptEmbeds, *, chunks: int | None = None
) -> None:
    """Fill in `embeds`' negative tensors: zeros where `negatives` is None, else the negative prompts encoded
    like the prompts (in `chunks` weighted chunks, or to the prompt embeddings' length)."""
    if negatives is None:
        embeds.negative_prompt_embeds = torch.zeros_like(embeds.prompt_embeds)
        embeds.negative_pooled_prompt_embeds = torch.zeros_like(embeds.pooled_prompt_embeds)
        return
    length = embeds.prompt_embeds.shape[1]
    hidden, pooled = encode_with_encoders(encoders, negatives, layer=-2, max_length=length, chunks=chunks)
    embeds.negative_prompt_embeds = hidden
    if embeds.negative_pooled_prompt_embeds is None:
        embeds.negative_pooled_prompt_embeds = pooled


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


# ---- the VAE in float32 ------------------------------------------------------------------------------------------


def needs_upcast(vae) -> bool:
    """SDXL's VAE overflows in float16; its config says so with `force_upcast`."""
    return vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))


@contextlib.contextmanager
def vae_upcast(vae) -> Iterator[None]:
    """Run `vae` in float32 inside the block when it needs it (`needs_upcast`), then cast it back."""
    if not needs_upcast(vae):
        yield
        return
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(dtype)


def latents_stats(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE config's per-channel `latents_mean` and `latents_std` (1, C, 1, 1), or None where it has none."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None
    like = dict(dtype=latents.dtype, device=latents.device)
    return torch.tensor(mean, **like).view(1, -1, 1, 1), torch.tensor(std, **like).view(1, -1, 1, 1)


def image_latents(
    vae, image: torch.Tensor, batch_size: int, *, generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """img2img's clean latents (batch_size, C, h, w), encoded in float32 where the VAE needs it and normalized
    by `latents_mean`/`latents_std` where the config has them; latents given as `image` pass through."""
    with vae_upcast(vae):
        latents = image_stages.image_latents_for_batch(vae, image, batch_size, generator=generator, dtype=dtype,
                                                       device=device)
    stats = latents_stats(vae, latents)
    if stats is not None and image.shape[1] != vae.config.latent_channels:
        mean, std = stats  # encode_images scaled by scaling_factor already: (z - mean) * s / std
        latents = (latents - mean * vae.config.scaling_factor) / std
    return latents


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


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) -> images in [-1, 1] (B, 3, 8h, 8w), undoing `latents_mean`/`latents_std` where the
    VAE config has them, in float32 when `force_upcast`; NaN or infinite output raises NonFiniteResultError."""
    with vae_upcast(vae):
        latents = latents.to(vae.dtype)
        stats = latents_stats(vae, latents)
        if stats is not None:
            latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W)
    check_finite_images(images, vae)
    return images


def check_finite_images(images: torch.Tensor, vae) -> None:
    """Raise on NaN or infinite images, saying what to do: the SDXL VAE overflows in float16."""
    if vae.dtype != torch.float16:
        stages.check_finite_images(images, vae)
        return
    arguments.check_finite_result(images, stage="the VAE decoder", advice=(
        f"float16 overflowed in the SDXL VAE (force_upcast={vae.config.get('force_upcast')}): keep "
        "vae.config.force_upcast=True, run the VAE in float32 (pipe.vae.to(torch.float32)), use "
        "torch_dtype=torch.bfloat16, or a float16-safe VAE such as madebyollin/sdxl-vae-fp16-fix"
    ))

"""The stages every Stable Diffusion pipeline is made of, each written once.

prompt -> `text.encode_prompt_batch` -> `prepare_latents` -> `retrieve_timesteps` -> `denoise` (UNet + scheduler,
guidance) -> `vae_codec.decode_latents` -> `run_safety_checker` -> `postprocess`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablepipe.pipelines import arguments
from stablepipe.pipelines.step_cache import step_cached_model
from stablepipe.random import Generator, randn_tensor

Prompt = str | list[str] | None


# ---- checks -------------------------------------------------------------------------------------------


def prompt_batch_size(prompt: Prompt, prompt_embeds: torch.Tensor | None) -> int:
    """How many prompts were given, as a string, a list, or embeddings (exactly one of them)."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("give a `prompt` (a string or a list of strings) or `prompt_embeds`")
    if prompt is None:
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) and prompt:
        return len(prompt)
    raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def check_negative_prompt(
    prompt: Prompt, negative_prompt: Prompt, batch_size: int, negative_prompt_embeds: torch.Tensor | None
) -> None:
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
    if negative_prompt is None or isinstance(negative_prompt, str):
        return
    if prompt is not None and isinstance(prompt, str):
        raise TypeError("`negative_prompt` is a list but `prompt` is a string; give both as strings or as lists")
    if len(negative_prompt) != batch_size:
        raise ValueError(
            f"got {len(negative_prompt)} negative prompts for {batch_size} prompts; "
            "give one negative prompt per prompt, or a single string for all"
        )


def check_size(height: int, width: int, *, multiple: int = 8) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple}, got {value!r}; "
                f"try {max(multiple, round(value / multiple) * multiple) if isinstance(value, int | float) else 512}"
            )


def check_steps(num_inference_steps: int | None, timesteps: Any, sigmas: Any) -> None:
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either custom `timesteps` or custom `sigmas`, not both")
    if timesteps is None and sigmas is None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")


def check_output_type(output_type: str, allowed: Sequence[str] = ("pil", "np", "pt", "latent")) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {tuple(allowed)}, got {output_type!r}")


def check_callback_inputs(requested: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [k for k in requested if k not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from {list(allowed)}")


# ---- text ---------------------------------------------------------------------------------------------


def repeat_per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """(B, ...) -> (B * n, ...), each prompt's copies next to each other."""
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale, for guidance-distilled UNets (LCM; Meng et al. 2023). (B, dim)"""
    w = w * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    angles = w.to(dtype)[:, None] * frequencies[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_embedding_kwargs(unet, guidance_scale: float, batch: int, *, device: torch.device) -> dict[str, Any]:
    """The UNet kwargs of a guidance-distilled model (LCM): the guidance scale as `timestep_cond` (batch, dim);
    none for other UNets."""
    dim = unet.config.get("time_cond_proj_dim")
    if dim is None:
        return {}
    w = torch.tensor(guidance_scale - 1).repeat(batch)
    return {"timestep_cond": guidance_scale_embedding(w, dim).to(device, unet.dtype)}


# ---- latents and timesteps -----------------------------------------------------------------------------


def prepare_latents(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: Generator,
    latents: torch.Tensor | None,
    init_noise_sigma: float,
) -> torch.Tensor:
    """Initial noise (B, C, h, w), drawn as diffusers draws it, scaled by the scheduler's starting sigma."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(
            f"got {len(generator)} generators for {shape[0]} images; pass one generator or one per image"
        )
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != tuple(shape):
        raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {tuple(shape)}")
    return latents.to(device) * init_noise_sigma


def retrieve_timesteps(
    scheduler,
    num_inference_steps: int | None,
    device: torch.device,
    *,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Set the scheduler's timesteps (from a step count, or custom timesteps or sigmas); return them and the count."""
    for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
        if values is not None:
            if name not in inspect.signature(scheduler.set_timesteps).parameters:
                raise ValueError(f"{type(scheduler).__name__} does not take custom {name}; use another scheduler")
            scheduler.set_timesteps(device=device, **{name: values})
            return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


def step_kwargs(scheduler, *, generator: Generator, eta: float) -> dict[str, Any]:
    """`eta` and `generator` for the schedulers whose `step` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


# ---- the denoising loop ---------------------------------------------------------------------------------


def classifier_free_guidance(
    noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Combine the (uncond, cond) halves (Ho & Salimans 2022), optionally rescaled (Lin et al. 2023, Sec. 3.4)."""
    uncond, cond = noise_pred.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


@dataclasses.dataclass
class Conditioning:
    """What the UNet is conditioned on. With guidance, every tensor is (uncond, cond) stacked on dim 0."""

    prompt_embeds: torch.Tensor  # (B, L, D)
    negative_prompt_embeds: torch.Tensor | None = None  # (B, L, D); None: no guidance
    unet_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # class_labels, added_cond_kwargs, ...
    extra_channels: torch.Tensor | None = None  # concatenated to the UNet input (inpainting mask, depth)
    concept_embeds: torch.Tensor | None = None  # (B, L, D); a third batch after (uncond, cond): SLD's safety concept

    @property
    def guided(self) -> bool:
        return self.negative_prompt_embeds is not None

    @property
    def copies(self) -> int:
        """How many times the latents are stacked for one UNet call: 1, 2 (uncond, cond) or 3 (+ concept)."""
        return 1 + self.guided + (self.concept_embeds is not None)

    def encoder_hidden_states(self) -> torch.Tensor:
        parts = (self.negative_prompt_embeds, self.prompt_embeds, self.concept_embeds)
        return torch.cat([p for p in parts if p is not None])  # (copies * B, L, D)


StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def predict_noise(
    pipe, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, *, model: Callable | None = None
) -> torch.Tensor:
    """The UNet's raw prediction for `latents` at `t`: (copies * B, C, h, w), e.g. (uncond, cond) with guidance.
    `model` is called in place of `pipe.unet`, with the same arguments (a tiled UNet, a denoiser wrapping it)."""
    model_input = torch.cat([latents] * cond.copies) if cond.copies > 1 else latents
    model_input = pipe.scheduler.scale_model_input(model_input, t)
    if cond.extra_channels is not None:
        model_input = torch.cat([model_input, cond.extra_channels], dim=1)
    hidden = cond.encoder_hidden_states()
    network = pipe.unet if model is None else model
    return network(model_input, t, encoder_hidden_states=hidden, **cond.unet_kwargs, return_dict=False)[0]


def denoise(
    pipe,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    num_inference_steps: int,
    step_kwargs: dict[str, Any],
    guidance_rescale: float = 0.0,
    guide: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: StepHook | None = None,
    callback_on_step_end: Callable | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    model: Callable | None = None,
) -> torch.Tensor:
    """Run the scheduler from `latents` over `timesteps`; returns the final latents (B, C, h, w).

    `guide(i, t, noise_pred)` replaces classifier-free guidance (safe latent diffusion uses it);
    `after_step(i, t, latents)` runs after each scheduler step (inpainting blends the known area there);
    `model` replaces `pipe.unet` in the UNet call (the upscalers' tiled UNet, the latent upscaler's denoiser).
    """
    pipe._num_timesteps = len(timesteps)
    model = step_cached_model(pipe, model)  # a fresh step cache per loop, where `enable_step_cache` asked for one
    order = getattr(pipe.scheduler, "order", 1)
    warmup = len(timesteps) - num_inference_steps * order
    with pipe.progress_bar(total=num_inference_steps) as bar:
        for i, t in enumerate(timesteps):
            if getattr(pipe, "_interrupt", False):
                continue
            noise_pred = predict_noise(pipe, latents, t, cond, model=model)
            if guide is not None:
                noise_pred = guide(i, t, noise_pred)
            elif cond.guided:
                noise_pred = classifier_free_guidance(noise_pred, pipe.guidance_scale, guidance_rescale)
            latents = pipe.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if after_step is not None:
                latents = after_step(i, t, latents)
            if callback_on_step_end is not None:
                latents = run_step_callback(
                    pipe, callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, cond
                )
            if i == len(timesteps) - 1 or (i + 1 > warmup and (i + 1) % order == 0):
                bar.update()
    check_finite_latents(pipe, latents)
    return latents


def check_finite_latents(pipe, latents: torch.Tensor) -> None:
    """The loop's result holds no NaN or inf (else the picture would be black): say what to do instead."""
    unet_dtype = getattr(getattr(pipe, "unet", None), "dtype", latents.dtype)
    otherwise = (
        f"guidance_scale={getattr(pipe, '_guidance_scale', None)} may be too large (7.5 is usual), or a LoRA, "
        "an embedding or a callback put NaN in"
    )
    arguments.check_finite_result(
        latents, stage="the denoising loop", advice=arguments.precision_advice(unet_dtype, "the UNet", otherwise)
    )


def check_callback_steps(callback_steps: int) -> None:
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")


def legacy_step_callback(
    callback: Callable[[int, torch.Tensor, torch.Tensor], Any],
    callback_steps: int,
    *,
    num_timesteps: int,
    num_inference_steps: int,
    order: int,
) -> StepHook:
    """diffusers' older `callback(step, t, latents)` as an `after_step` hook: called on progress-bar steps
    whose loop index is a multiple of `callback_steps`; it sees the latents but does not replace them."""
    warmup = num_timesteps - num_inference_steps * order

    def hook(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        counted = i == num_timesteps - 1 or (i + 1 > warmup and (i + 1) % order == 0)
        if counted and i % callback_steps == 0:
            callback(i // order, t, latents)
        return latents

    return hook


def run_step_callback(pipe, callback, names: Sequence[str], i: int, t, latents: torch.Tensor, cond: Conditioning):
    """diffusers' `callback_on_step_end(pipe, i, t, tensors) -> tensors`; returned tensors replace ours."""
    tensors = {
        "latents": latents, "prompt_embeds": cond.prompt_embeds, "negative_prompt_embeds": cond.negative_prompt_embeds
    }
    tensors.update({k: v for k, v in cond.unet_kwargs.items() if isinstance(v, torch.Tensor)})
    outputs = callback(pipe, i, t, {k: tensors.get(k) for k in names}) or {}
    cond.prompt_embeds = outputs.get("prompt_embeds", cond.prompt_embeds)
    cond.negative_prompt_embeds = outputs.get("negative_prompt_embeds", cond.negative_prompt_embeds)
    return outputs.get("latents", latents)

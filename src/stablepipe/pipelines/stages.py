"""The stages every Stable Diffusion pipeline is made of, each written once.

prompt -> `text.encode_prompt_batch` -> `prepare_latents` -> `retrieve_timesteps` -> `denoise` (UNet + scheduler,
guidance) -> `vae_codec.decode_latents` -> `run_safety_checker` -> `postprocess`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch

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


def check_callback_steps(callback_steps: int) -> None:
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")

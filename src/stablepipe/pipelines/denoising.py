"""The denoising loop, and the guiders that say how the UNet's predictions are combined.

`denoise(unet, scheduler, latents, timesteps, cond, guider=..., hooks=..., progress=...)` takes everything it
uses as an argument: it reads no pipeline and writes none. A pipeline builds its arguments once per call
(`pipelines/call.py`), so a value such as the guidance scale goes one way: the `__call__` argument -> the
guider (`choose_guider`, the one place that decides whether guidance is on) -> this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

from stablepipe.pipelines import arguments

# ---- guidance -------------------------------------------------------------------------------------------


class Guider(Protocol):
    """How many copies of the latent batch one UNet call takes, and how their predictions become one.

    `copies` is 1 (no guidance), 2 (uncond, cond) or 3 (uncond, cond, safety concept); `combine(i, t,
    prediction)` maps the stacked prediction (copies * B, C, h, w) to (B, C, h, w). `scale` is the guidance
    scale the user asked for (also shown in error messages)."""

    copies: int
    scale: float

    @property
    def guided(self) -> bool:
        """True when the UNet also sees an unconditional copy, so negative prompts are encoded."""

    def combine(self, i: int, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor: ...

    def with_scale(self, scale: float) -> Guider:
        """This guider at another guidance scale (a callback setting diffusers' `pipe._guidance_scale`)."""


@dataclasses.dataclass(frozen=True)
class NoGuidance:
    """One copy, the prediction as it is: guidance_scale <= 1, or a guidance-distilled UNet (LCM), which
    takes the scale as an embedding instead (`scale` is kept for that)."""

    scale: float = 1.0
    copies: ClassVar[int] = 1

    @property
    def guided(self) -> bool:
        return False

    def combine(self, i: int, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return prediction

    def with_scale(self, scale: float) -> Guider:
        """Still unguided: no negative prompt was encoded to switch guidance on with."""
        return NoGuidance(scale)


@dataclasses.dataclass(frozen=True)
class ClassifierFreeGuidance:
    """uncond + scale (cond - uncond) (Ho & Salimans 2022), optionally rescaled towards the conditional
    prediction's standard deviation (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are
    Flawed", Sec. 3.4)."""

    scale: float
    rescale: float = 0.0
    copies: ClassVar[int] = 2

    @property
    def guided(self) -> bool:
        return True

    def combine(self, i: int, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return classifier_free_guidance(prediction, self.scale, self.rescale)

    def with_scale(self, scale: float) -> Guider:
        """At `scale` > 1 still guided; at <= 1 unguided from then on (diffusers' dynamic-CFG recipe)."""
        return dataclasses.replace(self, scale=scale) if scale > 1 else NoGuidance(scale)


def classifier_free_guidance(
    noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Combine the (uncond, cond) halves of `noise_pred` (2B, C, h, w) -> (B, C, h, w)."""
    uncond, cond = noise_pred.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def choose_guider(guidance_scale: float, *, distilled: bool = False, rescale: float = 0.0) -> Guider:
    """Whether classifier-free guidance is on, decided here and nowhere else: for guidance_scale > 1 on a UNet
    that is not guidance-distilled (diffusers' `do_classifier_free_guidance`)."""
    if distilled or guidance_scale <= 1:
        return NoGuidance(guidance_scale)
    return ClassifierFreeGuidance(guidance_scale, rescale)


# ---- what the UNet is conditioned on ---------------------------------------------------------------------


@dataclasses.dataclass
class Conditioning:
    """What the UNet is conditioned on. Guided, every tensor is stacked (uncond, cond[, concept]) on dim 0."""

    prompt_embeds: torch.Tensor  # (B, L, D)
    negative_prompt_embeds: torch.Tensor | None = None  # (B, L, D); None without guidance
    unet_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # class_labels, added_cond_kwargs, ...
    extra_channels: torch.Tensor | None = None  # concatenated to the UNet input (inpainting mask, depth)
    concept_embeds: torch.Tensor | None = None  # (B, L, D); after (uncond, cond): SLD's safety concept

    def parts(self) -> list[str]:
        """The names of the stacked embeddings, in the order they are stacked."""
        names = ("negative_prompt_embeds", "prompt_embeds", "concept_embeds")
        return [name for name in names if getattr(self, name) is not None]

    def encoder_hidden_states(self) -> torch.Tensor:
        return torch.cat([getattr(self, name) for name in self.parts()])  # (copies * B, L, D)

    @property
    def copies(self) -> int:
        """How many stacked batches the embeddings hold: 1, 2 (uncond, cond) or 3 (+ concept)."""
        return len(self.parts())

    def unstack(self, hidden: torch.Tensor) -> None:
        """Take `hidden` (copies * B, L, D), stacked as `encoder_hidden_states` gives it, back apart; a tensor of
        one batch (B, L, D) replaces the conditional embeddings only."""
        parts = self.parts()
        if hidden.shape[0] != self.prompt_embeds.shape[0] * len(parts):
            self.prompt_embeds = hidden
            return
        for name, part in zip(parts, hidden.chunk(len(parts)), strict=True):
            setattr(self, name, part)

    def unguided(self) -> None:
        """Only the conditional copy from now on (a callback switched guidance off)."""
        self.negative_prompt_embeds = self.concept_embeds = None


# ---- hooks -----------------------------------------------------------------------------------------------

StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (i, t, latents) -> latents
StepEndHook = Callable[[int, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def never() -> bool:
    return False


@dataclasses.dataclass
class LoopHooks:
    """What runs around each step. `after_step` hooks run in order after the scheduler step (inpainting blends
    the known area back, diffusers' legacy `callback` watches); `on_step_end` is diffusers'
    `callback_on_step_end`, bound to its pipeline (it may replace the latents and the prompt embeddings);
    `interrupted()` true skips the remaining steps (diffusers' `pipe.interrupt`); `guider()`, read after each
    `on_step_end`, is the guider from then on (a callback may set `pipe._guidance_scale`, even to <= 1: then only
    the conditional copy runs)."""

    after_step: Sequence[StepHook] = ()
    on_step_end: StepEndHook | None = None
    interrupted: Callable[[], bool] = never
    guider: Callable[[], Guider] | None = None  # the guider after `on_step_end`, which may change the scale


def no_progress(total: int):
    """A progress bar that shows nothing: what the loop uses when it is given none."""
    return contextlib.nullcontext(_Silent())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


# ---- the loop ----------------------------------------------------------------------------------------------


def predict(
    unet: Callable, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, copies: int
) -> torch.Tensor:
    """The UNet's raw prediction for `latents` (B, C, h, w) at `t`: (copies * B, C, h, w)."""
    model_input = torch.cat([latents] * copies) if copies > 1 else latents
    model_input = scheduler.scale_model_input(model_input, t)
    if cond.extra_channels is not None:
        model_input = torch.cat([model_input, cond.extra_channels], dim=1)
    hidden = cond.encoder_hidden_states()
    return unet(model_input, t, encoder_hidden_states=hidden, **cond.unet_kwargs, return_dict=False)[0]


def counts_on_progress_bar(i: int, num_timesteps: int, num_inference_steps: int, order: int) -> bool:
    """Whether loop index `i` completes one of the `num_inference_steps` steps a user asked for (multi-stage
    schedulers such as Heun run `order` loop iterations per step, after `num_timesteps - steps * order` warmup
    iterations)."""
    warmup = num_timesteps - num_inference_steps * order
    return i == num_timesteps - 1 or (i + 1 > warmup and (i + 1) % order == 0)


def denoise(
    unet: Callable,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    guider: Guider,
    num_inference_steps: int | None = None,
    step_kwargs: dict[str, Any] | None = None,
    hooks: LoopHooks | None = None,
    progress: Callable[[int], Any] = no_progress,
) -> torch.Tensor:
    """Run `scheduler` from `latents` (B, C, h, w) over `timesteps`; returns the final latents.

    `unet` is called as a diffusers UNet (`unet(x, t, encoder_hidden_states=..., return_dict=False)[0]`): the
    UNet itself, or a tiled UNet, a step-cached UNet, a denoiser wrapping it. `guider` says how many copies of
    the batch each call takes and combines the predictions; `cond` must hold that many stacked embeddings.
    `progress(total)` gives a context manager with `update()` (a pipeline's `progress_bar`)."""
    if cond.copies != guider.copies:
        raise ValueError(
            f"the conditioning holds {cond.copies} stacked embedding batches but {type(guider).__name__} needs "
            f"{guider.copies}; encode negative prompts exactly when the guider is guided"
        )
    hooks = hooks or LoopHooks()
    num_inference_steps = num_inference_steps or len(timesteps)
    order = getattr(scheduler, "order", 1)
    with progress(num_inference_steps) as bar:
        for i, t in enumerate(timesteps):
            if hooks.interrupted():
                continue
            prediction = predict(unet, scheduler, latents, t, cond, guider.copies)
            prediction = guider.combine(i, t, prediction)
            latents = scheduler.step(prediction, t, latents, **(step_kwargs or {}), return_dict=False)[0]
            for hook in hooks.after_step:
                latents = hook(i, t, latents)
            if hooks.on_step_end is not None:
                latents = hooks.on_step_end(i, t, latents, cond)
                guider = hooks.guider() if hooks.guider is not None else guider
                if guider.copies == 1 < cond.copies:
                    cond.unguided()
            if counts_on_progress_bar(i, len(timesteps), num_inference_steps, order):
                bar.update()
    check_finite_latents(latents, getattr(unet, "dtype", latents.dtype), guider)
    return latents


def check_finite_latents(latents: torch.Tensor, unet_dtype: torch.dtype, guider: Guider) -> None:
    """The loop's result holds no NaN or inf (else the picture would be black): say what to do instead."""
    otherwise = (
        f"guidance_scale={guider.scale} may be too large (7.5 is usual), or a LoRA, an embedding or a callback "
        "put NaN in"
    )
    arguments.check_finite_result(
        latents, stage="the denoising loop", advice=arguments.precision_advice(unet_dtype, "the UNet", otherwise)
    )


# ---- diffusers' callbacks as hooks --------------------------------------------------------------------------


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

    def hook(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if counts_on_progress_bar(i, num_timesteps, num_inference_steps, order) and i % callback_steps == 0:
            callback(i // order, t, latents)
        return latents

    return hook


def step_end_callback(pipe, callback: Callable, names: Sequence[str]) -> StepEndHook:
    """diffusers' `callback_on_step_end(pipe, i, t, tensors) -> tensors` as a hook: the tensors it returns
    ("latents", "prompt_embeds", "negative_prompt_embeds") replace the loop's. As in diffusers, "prompt_embeds"
    is what the UNet sees, the copies stacked (uncond, cond[, concept]) when guided: a callback may hand back
    all of them or, switching guidance off, the conditional half (`prompt_embeds.chunk(2)[-1]`)."""

    def hook(i: int, t: torch.Tensor, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        stacked, negative = cond.encoder_hidden_states(), cond.negative_prompt_embeds
        tensors = {"latents": latents, "prompt_embeds": stacked, "negative_prompt_embeds": negative}
        tensors.update({k: v for k, v in cond.unet_kwargs.items() if isinstance(v, torch.Tensor)})
        outputs = callback(pipe, i, t, {k: tensors.get(k) for k in names}) or {}
        if outputs.get("prompt_embeds") is not None and outputs["prompt_embeds"] is not stacked:
            cond.unstack(outputs["prompt_embeds"])
        if outputs.get("negative_prompt_embeds") is not None and outputs["negative_prompt_embeds"] is not negative:
            cond.negative_prompt_embeds = outputs["negative_prompt_embeds"]
        return outputs.get("latents", latents)

    return hook

"""Safe Stable Diffusion: text-to-image with Safe Latent Diffusion guidance (Schramowski et al. 2023).

SLD runs the UNet on a third batch conditioned on a text describing unsafe content (the safety concept)
and, where the prompt's prediction comes close to the concept's, steers away from it. The safety checker
still runs on the result; the images it flags come back black and are also returned as `unsafe_images`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from stablepipe.image import ImageInput, denormalize, postprocess
from stablepipe.models.safety import black_out, run_safety_checker
from stablepipe.outputs import BaseOutput
from stablepipe.pipelines import arguments, stages, text, vae_codec
from stablepipe.pipelines.base import diffusers_call
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase
from stablepipe.random import Generator

# The concept text of the SLD paper (and of diffusers), covering the I2P benchmark's categories.
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)


def _preset(warmup: int, scale: float, threshold: float, momentum: float, beta: float) -> Mapping[str, float]:
    return MappingProxyType(dict(
        sld_warmup_steps=warmup, sld_guidance_scale=scale, sld_threshold=threshold, sld_momentum_scale=momentum,
        sld_mom_beta=beta,
    ))


class SafetyConfig:
    """The paper's SLD hyper-parameter sets (Schramowski et al. 2023), as in diffusers:
    `pipe(prompt, **SafetyConfig.MEDIUM)`."""

    #              warmup delta  s_S   lambda  s_m  beta_m
    WEAK = _preset(15,           20,   0.0,    0.0, 0.0)
    MEDIUM = _preset(10,         1000, 0.01,   0.3, 0.4)
    STRONG = _preset(7,          2000, 0.025,  0.5, 0.7)
    MAX = _preset(0,             5000, 1.0,    0.5, 0.7)
    LEVELS = ("WEAK", "MEDIUM", "STRONG", "MAX")

    @classmethod
    def preset(cls, level: str) -> Mapping[str, float]:
        """The preset named `level` (any case): WEAK, MEDIUM, STRONG or MAX."""
        if not isinstance(level, str) or level.upper() not in cls.LEVELS:
            raise ValueError(f"unknown safety level {level!r}; choose one of {', '.join(cls.LEVELS)}")
        return getattr(cls, level.upper())


@dataclasses.dataclass
class StableDiffusionSafePipelineOutput(BaseOutput):
    """diffusers' fields. `unsafe_images`: the flagged images as generated (before blacking out), in batch
    order, the same type as `images`; None when no checker ran or nothing was flagged (their index in the batch
    is where `nsfw_content_detected` is True). `applied_safety_concept`: the concept text, or None without SLD."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    unsafe_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    applied_safety_concept: str | None


@dataclasses.dataclass
class SafeLatentDiffusion:
    """Safe Latent Diffusion guidance (Schramowski et al. 2023, Eqs. 3-8) as a guider of the denoising loop.

    It takes the UNet's prediction for (uncond, cond, safety concept) and returns the guided noise; the
    momentum of the safety guidance is its only state, so a fresh instance serves each generation
    (`choose_safe_guidance`).
    """

    scale: float  # s_g, classifier-free guidance
    sld_guidance_scale: float  # s_S, Eq. 6
    sld_warmup_steps: int  # delta: no safety guidance before this loop index (momentum builds up meanwhile)
    sld_threshold: float  # lambda, Eq. 6
    sld_momentum_scale: float  # s_m, Eq. 7
    sld_mom_beta: float  # beta_m, Eq. 8
    momentum: torch.Tensor | None = None  # (B, C, h, w): nu_t, Eq. 8
    copies: ClassVar[int] = 3  # (uncond, cond, safety concept)

    @property
    def guided(self) -> bool:
        return True

    def safety_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        """gamma(z_t, c_p, c_S) with momentum (Eqs. 4-8), updating the momentum. (B, C, h, w)"""
        distance = cond - concept  # (B, C, h, w)
        scale = torch.clamp(distance.abs() * self.sld_guidance_scale, max=1.0)  # Eq. 6, mu
        scale = torch.where(distance >= self.sld_threshold, torch.zeros_like(scale), scale)  # Eq. 6, threshold
        guidance = (concept - uncond) * scale  # Eq. 4
        momentum = torch.zeros_like(guidance) if self.momentum is None else self.momentum
        guidance = guidance + self.sld_momentum_scale * momentum  # Eq. 7
        self.momentum = self.sld_mom_beta * momentum + (1 - self.sld_mom_beta) * guidance  # Eq. 8
        return guidance

    def combine(self, i: int, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """(3B, C, h, w) stacked (uncond, cond, concept) -> the guided noise (B, C, h, w)."""
        uncond, cond, concept = prediction.chunk(3)  # (B, C, h, w) each
        guidance = cond - uncond
        safety = self.safety_guidance(uncond, cond, concept)
        if i >= self.sld_warmup_steps:
            guidance = guidance - safety  # Eq. 3
        return uncond + self.scale * guidance

    __call__ = combine  # also a plain function (i, t, prediction) -> guided noise

    def with_scale(self, scale: float) -> SafeLatentDiffusion:
        """At another classifier-free guidance scale, the safety guidance and its momentum kept."""
        return dataclasses.replace(self, scale=scale)


def choose_safe_guidance(
    guided: bool,
    guidance_scale: float,
    *,
    sld_guidance_scale: float,
    sld_warmup_steps: int,
    sld_threshold: float,
    sld_momentum_scale: float,
    sld_mom_beta: float,
) -> SafeLatentDiffusion | None:
    """Whether safe latent diffusion is on, decided here and nowhere else: on top of classifier-free guidance
    (`guided`) with sld_guidance_scale > 1. Returns a fresh guider (its momentum starts at zero), or None: the
    call's own guider then runs (classifier-free guidance, or none)."""
    check_sld_arguments(
        sld_warmup_steps, sld_mom_beta, sld_guidance_scale=sld_guidance_scale, sld_threshold=sld_threshold,
        sld_momentum_scale=sld_momentum_scale,
    )
    if not guided or sld_guidance_scale <= 1:
        return None
    return SafeLatentDiffusion(
        guidance_scale, sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale, sld_mom_beta
    )


def check_sld_arguments(sld_warmup_steps: int, sld_mom_beta: float, **scales: float) -> None:
    if not isinstance(sld_warmup_steps, int) or sld_warmup_steps < 0:
        raise ValueError(f"sld_warmup_steps must be an integer >= 0, got {sld_warmup_steps!r}")
    if not isinstance(sld_mom_beta, int | float) or not 0 <= sld_mom_beta <= 1:
        raise ValueError(f"sld_mom_beta is the share of momentum kept per step, in [0, 1]; got {sld_mom_beta!r}")
    for name, value in scales.items():
        if not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")


class StableDiffusionPipelineSafe(StableDiffusionBase):
    """Text-to-image with Safe Latent Diffusion; set `pipe.safety_concept` to steer away from another concept."""

    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    _latent_unet = True

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = True,
    ):
        """diffusers' components; `image_encoder` (for IP-Adapters, which stablepipe does not run) is only kept."""
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._safety_concept = DEFAULT_SAFETY_CONCEPT

    @property
    def safety_concept(self) -> str:
        """The text that safety guidance steers away from."""
        return self._safety_concept

    @safety_concept.setter
    def safety_concept(self, concept: str) -> None:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"safety_concept must be a non-empty string, got {concept!r}")
        self._safety_concept = concept

    def encode_safety_concept(self, batch: int, *, device: torch.device, like: torch.Tensor) -> torch.Tensor:
        """The safety concept's text embeddings, one copy per image: (batch, L, D) with L, dtype of `like`."""
        encoder = text.TextEncoder(text.SD_TEXT_ENCODER, self.tokenizer, self.text_encoder)
        embeds, _ = text.encode_texts(encoder, [self._safety_concept], device=device, max_length=like.shape[1])
        return embeds.to(like.dtype).repeat(batch, 1, 1)

    def finish_safe(self, latents: torch.Tensor, output_type: str):
        """Decode, run the safety checker keeping what it flags, convert: (images, flags, unsafe images)."""
        if output_type == "latent":
            return postprocess(latents, output_type), None, None
        decoded = denormalize(vae_codec.decode_latents(self.vae, latents))  # (B, 3, H, W) in [0, 1]
        checked, flags = run_safety_checker(
            self.safety_checker, self.feature_extractor, decoded, device=self.device, dtype=self.unet.dtype
        )
        flagged = flags is not None and any(flags)
        keep = [False] * decoded.shape[0]  # already in [0, 1]
        images = postprocess(black_out(checked, flags) if flagged else checked, output_type, do_denormalize=keep)
        if not flagged:
            return images, flags, None
        self.warn_once("The flagged images are kept in the output's `unsafe_images`; view them at your discretion.")
        unsafe = decoded[torch.tensor(flags, device=decoded.device)]  # (k, 3, H, W)
        return images, flags, postprocess(unsafe, output_type, do_denormalize=keep[: unsafe.shape[0]])

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
        callback_steps: int = 1,
        sld_guidance_scale: float = 1000,
        sld_warmup_steps: int = 10,
        sld_threshold: float = 0.01,
        sld_momentum_scale: float = 0.3,
        sld_mom_beta: float = 0.4,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: ImageInput | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unsupported: Any,
    ) -> StableDiffusionSafePipelineOutput | tuple:
        # 1. Check inputs; safe latent diffusion on or off
        device = self.begin_call(
            unsupported, guidance_scale=guidance_scale, output_type=output_type,
            callback_inputs=callback_on_step_end_tensor_inputs,
        )
        height, width = self.default_size(height, width)
        stages.check_size(height, width)
        stages.check_steps(num_inference_steps, None, None)
        stages.check_callback_steps(callback_steps)
        sld = choose_safe_guidance(
            self.do_classifier_free_guidance, guidance_scale, sld_guidance_scale=sld_guidance_scale,
            sld_warmup_steps=sld_warmup_steps, sld_threshold=sld_threshold, sld_momentum_scale=sld_momentum_scale,
            sld_mom_beta=sld_mom_beta,
        )
        if sld is None:
            self.warn_once("Safe latent diffusion is off: it needs guidance_scale > 1 and sld_guidance_scale > 1.")
        # 2. Encode the prompt, and the safety concept
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        )
        batch = prompt_embeds.shape[0]
        concept = None if sld is None else self.encode_safety_concept(batch, device=device, like=prompt_embeds)
        # 3. Timesteps
        timesteps, num_inference_steps = stages.retrieve_timesteps(self.scheduler, num_inference_steps, device)
        # 4. Initial noise
        latents = self.initial_noise(
            batch, height, width, dtype=prompt_embeds.dtype, generator=generator, latents=latents,
            channels=self.unet.config.in_channels,
        )
        # 5. Denoise, with safety guidance
        latents = self.run_denoise(
            latents, timesteps, Conditioning(prompt_embeds, negative_prompt_embeds, concept_embeds=concept),
            num_inference_steps=num_inference_steps, generator=generator, eta=eta, callback=callback,
            callback_steps=callback_steps, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guider=sld,
        )
        # 6. Decode, check (keeping the flagged images), convert
        applied_concept = None if sld is None else self._safety_concept
        images, flags, unsafe = self.finish_safe(latents, output_type)
        if not return_dict:
            return images, flags, applied_concept, unsafe  # diffusers' tuple order
        return StableDiffusionSafePipelineOutput(images, flags, unsafe, applied_concept)

"""Stable Diffusion 1.x / 2.x image-to-image (SDEdit: noise the image part way, then denoise with the prompt)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablepipe.image import ImageInput
from stablepipe.pipelines import arguments, image_stages
from stablepipe.pipelines.base import StableDiffusionPipelineOutput, diffusers_call
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase
from stablepipe.random import Generator


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """Image-to-image with a text-to-image checkpoint: `strength` says how much of the image is repainted."""

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
        if vae is not None and unet is not None:  # either may be None for a text-encoding-only pipeline
            image_stages.check_unet_channels(unet, [vae.config.latent_channels], type(self).__name__)
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker=safety_checker,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: ImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unsupported: Any,
    ) -> StableDiffusionPipelineOutput:
        # 1. Check inputs
        device = self.begin_call(
            unsupported, guidance_scale=guidance_scale, output_type=output_type,
            callback_inputs=callback_on_step_end_tensor_inputs,
        )
        image_stages.check_schedule(num_inference_steps, strength, timesteps=timesteps, sigmas=sigmas)
        image_stages.check_unet_channels(self.unet, [self.vae.config.latent_channels], type(self).__name__)
        # 2. Preprocess the image: (B, 3, H, W) in [-1, 1], or latents
        image = image_stages.preprocess_image(
            image, multiple=self.vae_scale_factor, latent_channels=self.vae.config.latent_channels
        )
        # 3. Encode the prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        batch = prompt_embeds.shape[0]
        # 4. Timesteps, the first (1 - strength) of them skipped
        timesteps, num_inference_steps = image_stages.strength_schedule(
            self.scheduler, num_inference_steps, strength, device, timesteps=timesteps, sigmas=sigmas
        )
        # 5. The image's latents, noised to the first timestep
        latents = image_stages.noised_image_latents(
            self.vae, self.scheduler, image, batch, timesteps[:1], generator=generator, dtype=prompt_embeds.dtype,
            device=device,
        )
        # 6. Denoise
        unet_kwargs = self.unet_kwargs(batch, cross_attention_kwargs, ip_adapter_image, ip_adapter_image_embeds)
        cond = Conditioning(prompt_embeds, negative_prompt_embeds, unet_kwargs)
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 7. Decode, check, convert
        return self.finish(latents, output_type, return_dict)

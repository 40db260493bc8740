"""Stable Diffusion 1.x / 2.x text-to-image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablepipe.image import ImageInput, denormalize, postprocess
from stablepipe.models.safety import run_safety_checker
from stablepipe.pipelines import arguments, stages, text, vae_codec
from stablepipe.pipelines.base import DiffusionPipeline, StableDiffusionPipelineOutput, diffusers_call, processor_kwargs
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.ip_adapter import IPAdapterPipelineMixin, ip_adapter_unet_kwargs
from stablepipe.random import Generator

SAFETY_OFF_WARNING = (
    "The safety checker is off (safety_checker=None). Keep it on for any public-facing use; "
    "see the Stable Diffusion license."
)


class StableDiffusionBase(IPAdapterPipelineMixin, DiffusionPipeline):
    """The components and stages shared by the SD 1.x / 2.x pipelines (IP-Adapters included)."""

    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    _config_keys = ("requires_safety_checker",)
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")

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
        """diffusers' components; `image_encoder` is the CLIP vision model IP-Adapters read (`load_ip_adapter`)."""
        self.check_safety_components(safety_checker, feature_extractor, warn_if_off=requires_safety_checker)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        self.requires_safety_checker = requires_safety_checker

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        sample = self.unet.config.sample_size * self.vae_scale_factor
        return height or sample, width or sample

    def encode_prompt(
        self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
        prompt_embeds=None, negative_prompt_embeds=None, lora_scale: float | None = None, clip_skip=None, **kwargs,
    ):
        """diffusers' signature: returns (prompt_embeds, negative_prompt_embeds); `lora_scale` scales the text
        encoder's LoRA adapters for this call."""
        weighted = kwargs.pop("prompt_weighting", self.prompt_weighting)  # A1111 `(word:1.3)` syntax, long prompts
        with self.lora_scale(lora_scale):
            embeds = text.encode_prompt_batch(
                text.bind_text_encoders(self, [text.SD_TEXT_ENCODER]), prompt, negative_prompt, device=device,
                given=text.PromptEmbeds(prompt_embeds, negative_prompt_embeds), guided=do_classifier_free_guidance,
                num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip, weighted=weighted, **kwargs,
            )
        return embeds.prompt_embeds, embeds.negative_prompt_embeds

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU in the UNet (see `UNet2DConditionModel.enable_freeu`), as diffusers' pipelines offer it."""
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def check_safety_components(self, safety_checker, feature_extractor, *, warn_if_off: bool) -> None:
        """A safety checker comes with its feature extractor; without one, a warning (once) where asked."""
        if safety_checker is None and warn_if_off:
            self.warn_once(SAFETY_OFF_WARNING)
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("a safety_checker needs its feature_extractor (a CLIPImageProcessor); pass both")

    def unet_kwargs(
        self, batch: int, cross_attention_kwargs: dict[str, Any] | None, ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The UNet kwargs of every step: the guidance embedding (LCM), the attention processors' kwargs and the
        IP-Adapters' image embeds (`batch`: prompts x images per prompt)."""
        ip_adapter = ip_adapter_unet_kwargs(self, ip_adapter_image, ip_adapter_image_embeds, batch_size=batch,
                                            guided=self.do_classifier_free_guidance, device=self.device)  # fmt: skip
        return {**self.guidance_embedding(batch), **processor_kwargs(cross_attention_kwargs), **ip_adapter}

    def guidance_embedding(self, batch: int) -> dict[str, Any]:
        """UNet kwargs for guidance-distilled models (LCM): the guidance scale as `timestep_cond`."""
        return stages.guidance_embedding_kwargs(self.unet, self.guidance_scale, batch, device=self.device)

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode, run the safety checker, convert: the last stages of every SD pipeline."""
        if output_type == "latent":
            images, flags = latents, None
        else:
            decoded = denormalize(vae_codec.decode_latents(self.vae, latents))  # (B, 3, H, W) in [0, 1]
            decoded, flags = run_safety_checker(
                self.safety_checker, self.feature_extractor, decoded, device=self.device, dtype=self.unet.dtype
            )
            images = postprocess(decoded, output_type, do_denormalize=[False] * len(decoded))
        if not return_dict:
            return images, flags
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=flags)


class StableDiffusionPipeline(StableDiffusionBase):
    """Text-to-image with Stable Diffusion 1.x and 2.x (epsilon or v-prediction)."""

    _latent_unet = True

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: ImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unsupported: Any,
    ) -> StableDiffusionPipelineOutput:
        # 1. Check inputs
        device = self.begin_call(
            unsupported, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, output_type=output_type,
            callback_inputs=callback_on_step_end_tensor_inputs,
        )
        height, width = self.default_size(height, width)
        stages.check_size(height, width)
        stages.check_steps(num_inference_steps, timesteps, sigmas)
        # 2. Encode the prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        batch = prompt_embeds.shape[0]
        # 3. Timesteps
        timesteps, num_inference_steps = stages.retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        # 4. Initial noise
        latents = self.initial_noise(
            batch, height, width, dtype=prompt_embeds.dtype, generator=generator, latents=latents,
            channels=self.unet.config.in_channels,
        )
        # 5. Denoise
        unet_kwargs = self.unet_kwargs(batch, cross_attention_kwargs, ip_adapter_image, ip_adapter_image_embeds)
        cond = Conditioning(prompt_embeds, negative_prompt_embeds, unet_kwargs)
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 6. Decode, check, convert
        return self.finish(latents, output_type, return_dict)

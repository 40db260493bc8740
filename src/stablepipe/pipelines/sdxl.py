"""Stable Diffusion XL: text-to-image, image-to-image (the refiner too) and inpainting.

The base -> refiner ensemble, as in diffusers:

    latents = base(prompt, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, image=latents, denoising_start=0.8).images[0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from stablepipe.image import ImageInput, postprocess
from stablepipe.outputs import BaseOutput
from stablepipe.pipelines import arguments, image_stages, sdxl_stages, stages, text, vae_codec
from stablepipe.pipelines.base import DiffusionPipeline, diffusers_call, processor_kwargs
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.inpaint import InpaintStages, MaskProcessorMixin, paste_back
from stablepipe.pipelines.ip_adapter import IPAdapterPipelineMixin, ip_adapter_unet_kwargs
from stablepipe.pipelines.sdxl_stages import MicroConditioning
from stablepipe.pipelines.text import PromptEmbeds
from stablepipe.random import Generator

WATERMARK_WARNING = (
    "stablepipe does not apply SDXL's invisible watermark (add_watermarker=True is ignored); "
    "pass add_watermarker=False to silence this"
)


@dataclasses.dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    """`images`: PIL images, an array (B, H, W, C), a tensor (B, C, H, W) or latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class StableDiffusionXLBase(IPAdapterPipelineMixin, DiffusionPipeline):
    """What the SDXL pipelines share: two text encoders, micro-conditioning, and an upcasting VAE decode."""

    _optional_components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder",
                            "feature_extractor")
    _config_keys = ("force_zeros_for_empty_prompt", "add_watermarker")
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        if add_watermarker:
            self.warn_once(WATERMARK_WARNING)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.add_watermarker = add_watermarker

    @property
    def vae_scale_factor(self) -> int:
        return vae_codec.scale_factor(self.vae)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        sample = self.unet.config.sample_size * self.vae_scale_factor
        return height or sample, width or sample

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU in the UNet (see `UNet2DConditionModel.enable_freeu`), as diffusers' pipelines offer it."""
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    @property
    def denoising_end(self) -> float | None:
        return getattr(self, "_denoising_end", None)

    @property
    def denoising_start(self) -> float | None:
        return getattr(self, "_denoising_start", None)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple:
        """diffusers' signature: (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds)."""
        given = PromptEmbeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        return self.embed_prompts(
            (prompt, prompt_2), (negative_prompt, negative_prompt_2), given, device=device or self.device,
            num_images_per_prompt=num_images_per_prompt, guided=do_classifier_free_guidance, clip_skip=clip_skip,
            lora_scale=lora_scale,
        ).as_tuple()

    def embed_prompts(
        self, prompts: tuple, negatives: tuple, given: PromptEmbeds, *, device: torch.device,
        num_images_per_prompt: int, clip_skip: int | None, guided: bool | None = None, lora_scale: float | None = None,
    ) -> PromptEmbeds:
        """Both encoders' embeddings of (prompt, prompt_2) and (negative_prompt, negative_prompt_2), in the second
        encoder's dtype (the UNet's without one); `guided` defaults to this call's guidance."""
        specs = [dataclasses.replace(spec, zeros_for_empty_negative=self.force_zeros_for_empty_prompt)
                 for spec in text.SDXL_TEXT_ENCODERS]  # fmt: skip
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        with self.lora_scale(lora_scale):  # the text encoders' LoRA adapters, as diffusers' lora_scale
            return text.encode_prompt_batch(
                text.bind_text_encoders(self, specs), prompts[0], negatives[0], prompt_2=prompts[1],
                negative_prompt_2=negatives[1], given=given, device=device, dtype=dtype,
                num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip, weighted=self.prompt_weighting,
                guided=self.do_classifier_free_guidance if guided is None else guided,
            )

    def check_time_ids(self, pooled_prompt_embeds: torch.Tensor | None) -> None:
        """Does the UNet take the micro-conditioning this pipeline builds (6 ids, or 5 for the refiner)?"""
        aesthetic = getattr(self, "requires_aesthetics_score", None)
        projection_dim = None  # unknown without a second encoder or pooled embeddings: encode_prompt asks for them
        if self.text_encoder_2 is not None:
            projection_dim = self.text_encoder_2.config.projection_dim
        elif pooled_prompt_embeds is not None:
            projection_dim = pooled_prompt_embeds.shape[-1]
        num_ids = 5 if aesthetic else 6
        sdxl_stages.check_time_ids(self.unet, num_ids, projection_dim, requires_aesthetics_score=aesthetic)

    def conditioning(
        self, embeds: PromptEmbeds, ids: tuple[list[float], list[float]], *, repeat_pairs: bool = False,
        cross_attention_kwargs: dict | None = None, ip_adapter: tuple = (None, None),
    ) -> Conditioning:
        """Everything the UNet is conditioned on: text, pooled text and micro-conditioning ids, the IP-Adapters'
        image embeds (`ip_adapter`: (ip_adapter_image, ip_adapter_image_embeds)), the guidance embedding."""
        batch = embeds.prompt_embeds.shape[0]
        added = sdxl_stages.added_cond_kwargs(embeds, *ids, batch=batch, repeat_pairs=repeat_pairs)
        images = ip_adapter_unet_kwargs(self, *ip_adapter, batch_size=batch, guided=self.do_classifier_free_guidance,
                                        device=self.device)  # fmt: skip
        added.update(images.get("added_cond_kwargs", {}))
        guidance = stages.guidance_embedding_kwargs(self.unet, self.guidance_scale, batch, device=self.device)
        unet_kwargs = {"added_cond_kwargs": added, **guidance, **processor_kwargs(cross_attention_kwargs)}
        return Conditioning(embeds.prompt_embeds, embeds.negative_prompt_embeds, unet_kwargs)

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode (in float32 where the VAE needs it) and convert; SDXL has no safety checker."""
        if output_type == "latent":
            images = latents
        else:
            images = postprocess(vae_codec.decode_latents(self.vae, latents, upcast=True), output_type)
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)


class StableDiffusionXLPipeline(StableDiffusionXLBase):
    """Text-to-image with Stable Diffusion XL (base model; `denoising_end` hands over to the refiner)."""

    _latent_unet = True

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: ImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unsupported: Any,
    ) -> StableDiffusionXLPipelineOutput:
        # 1. Check inputs
        device = self.begin_call(
            unsupported, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, output_type=output_type,
            callback_inputs=callback_on_step_end_tensor_inputs,
        )
        height, width = self.default_size(height, width)
        stages.check_size(height, width, multiple=self.vae_scale_factor)
        stages.check_steps(num_inference_steps, timesteps, sigmas)
        sdxl_stages.check_denoising_fractions(None, denoising_end)
        self.check_time_ids(pooled_prompt_embeds)
        self._denoising_end = denoising_end
        micro = MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                  negative_crops_coords_top_left, negative_target_size)
        # 2. Encode the prompt with both text encoders
        embeds = self.embed_prompts(
            (prompt, prompt_2), (negative_prompt, negative_prompt_2),
            PromptEmbeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
            device=device, num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
        )
        # 3. Timesteps, cut at denoising_end when the refiner takes over
        timesteps, num_inference_steps = stages.retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        timesteps, num_inference_steps = sdxl_stages.cut_at_denoising_end(
            self.scheduler, timesteps, num_inference_steps, denoising_end
        )
        sdxl_stages.set_begin_index(self.scheduler, 0)
        # 4. Initial noise
        latents = self.initial_noise(
            embeds.prompt_embeds.shape[0], height, width, dtype=embeds.prompt_embeds.dtype, generator=generator,
            latents=latents, channels=self.unet.config.in_channels,
        )
        # 5. Conditioning: text, pooled text, micro-conditioning, IP-Adapter images
        cond = self.conditioning(embeds, micro.text_to_image_ids(height, width), repeat_pairs=True,
                                 cross_attention_kwargs=cross_attention_kwargs,
                                 ip_adapter=(ip_adapter_image, ip_adapter_image_embeds))  # fmt: skip
        # 6. Denoise
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 7. Decode (float32 VAE where needed) and convert
        return self.finish(latents, output_type, return_dict)


class StableDiffusionXLImageBase(StableDiffusionXLBase):
    """SDXL pipelines that start from an image; `requires_aesthetics_score` marks the refiner's UNet."""

    _config_keys = ("requires_aesthetics_score", "force_zeros_for_empty_prompt", "add_watermarker")

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.requires_aesthetics_score = requires_aesthetics_score

    def check_image_inputs(
        self, strength: float, num_inference_steps: int, schedule: tuple, denoising: tuple[float | None, float | None],
        pooled_prompt_embeds: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """The steps (or custom `schedule` = (timesteps, sigmas)), strength in [0, 1] leaving a step (unless
        `denoising_start` or a custom schedule picks the steps), the denoising fractions, the UNet's time ids."""
        stages.check_steps(num_inference_steps, *schedule)
        denoising_start, denoising_end = denoising
        sdxl_stages.check_denoising_fractions(denoising_start, denoising_end)
        custom = any(values is not None for values in schedule)
        image_stages.check_strength(strength, None if custom or sdxl_stages.is_fraction(denoising_start)
                                    else num_inference_steps)  # fmt: skip
        self.check_time_ids(pooled_prompt_embeds)
        self._denoising_start, self._denoising_end = denoising_start, denoising_end

    def image_timesteps(
        self, num_inference_steps: int, strength: float, device: torch.device, *, timesteps=None, sigmas=None
    ) -> tuple[torch.Tensor, int]:
        """The schedule, started at `denoising_start` or cut by `strength`, then cut at `denoising_end`."""
        timesteps, num_inference_steps = stages.retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        timesteps, num_inference_steps = sdxl_stages.image_timesteps(
            self.scheduler, num_inference_steps, strength=strength, denoising_start=self.denoising_start
        )
        return sdxl_stages.cut_at_denoising_end(self.scheduler, timesteps, num_inference_steps, self.denoising_end)

    def image_conditioning(
        self, embeds: PromptEmbeds, micro: MicroConditioning, latents: torch.Tensor, cross_attention_kwargs=None,
        ip_adapter: tuple = (None, None),
    ) -> Conditioning:
        """The UNet's conditioning, with the micro-conditioning sizes defaulting to the latents' pixel size."""
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        ids = micro.image_to_image_ids(height, width, aesthetic=self.requires_aesthetics_score)
        return self.conditioning(embeds, ids, cross_attention_kwargs=cross_attention_kwargs, ip_adapter=ip_adapter)


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLImageBase):
    """SDXL image-to-image: the refiner (on an image, or on the base's latents with `denoising_start`) and
    image-to-image with the base model."""

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: ImageInput | None = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: ImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unsupported: Any,
    ) -> StableDiffusionXLPipelineOutput:
        # 1. Check inputs
        device = self.begin_call(
            unsupported, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, output_type=output_type,
            callback_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_image_inputs(strength, num_inference_steps, (timesteps, sigmas), (denoising_start, denoising_end),
                                pooled_prompt_embeds)  # fmt: skip
        micro = MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                  negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                                  negative_aesthetic_score)
        # 2. Encode the prompt (the refiner has only the second text encoder)
        embeds = self.embed_prompts(
            (prompt, prompt_2), (negative_prompt, negative_prompt_2),
            PromptEmbeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
            device=device, num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
        )
        # 3. Preprocess the image: (B, 3, H, W) in [-1, 1], or the base model's latents
        image = image_stages.preprocess_image(
            image, multiple=self.vae_scale_factor, latent_channels=self.vae.config.latent_channels
        )
        # 4. Timesteps: from denoising_start, or the last `strength` of them; cut at denoising_end
        timesteps, num_inference_steps = self.image_timesteps(
            num_inference_steps, strength, device, timesteps=timesteps, sigmas=sigmas
        )
        # 5. The image's latents, noised to the first timestep unless the refiner continues the base's latents
        if latents is None:
            latents = sdxl_stages.image_latents(
                self.vae, image, embeds.prompt_embeds.shape[0], generator=generator,
                dtype=embeds.prompt_embeds.dtype, device=device,
            )
            if denoising_start is None:
                latents, _ = image_stages.noise_to_timestep(self.scheduler, latents, timesteps[:1], generator=generator)
        else:
            sdxl_stages.check_given_latents(latents, image, embeds.prompt_embeds.shape[0], self.vae_scale_factor)
        # 6. Denoise
        cond = self.image_conditioning(embeds, micro, latents, cross_attention_kwargs,
                                       ip_adapter=(ip_adapter_image, ip_adapter_image_embeds))  # fmt: skip
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 7. Decode (float32 VAE where needed) and convert
        return self.finish(latents, output_type, return_dict)


class StableDiffusionXLInpaintPipeline(MaskProcessorMixin, StableDiffusionXLImageBase):
    """SDXL inpainting with the base model or refiner (4-channel UNet: the known area is blended back after each
    step) or an SDXL inpainting UNet (9 channels). The latents, mask and blending stages are Stable Diffusion
    inpainting's; SDXL adds its conditioning, the float32 VAE and `denoising_start` / `denoising_end`."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: ImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unsupported: Any,
    ) -> StableDiffusionXLPipelineOutput:
        # 1. Check inputs
        device = self.begin_call(
            unsupported, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, output_type=output_type,
            callback_inputs=callback_on_step_end_tensor_inputs,
        )
        height, width = self.default_size(height, width)
        self.check_image_inputs(strength, num_inference_steps, (timesteps, sigmas), (denoising_start, denoising_end),
                                pooled_prompt_embeds)  # fmt: skip
        batch = stages.prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        inpaint = self.inpaint_stages()
        images, masks = self.check_inpaint_inputs(
            inpaint, image, mask_image, masked_image_latents, height=height, width=width, batch=batch,
            generator=generator, padding_mask_crop=padding_mask_crop, output_type=output_type, strength=strength,
        )
        micro = MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                  negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                                  negative_aesthetic_score)
        # 2. Encode the prompt
        embeds = self.embed_prompts(
            (prompt, prompt_2), (negative_prompt, negative_prompt_2),
            PromptEmbeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
            device=device, num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
        )
        dtype, guided = embeds.prompt_embeds.dtype, self.do_classifier_free_guidance
        # 3. Timesteps: from denoising_start, or the last `strength` of them; cut at denoising_end
        timesteps, num_inference_steps = self.image_timesteps(
            num_inference_steps, strength, device, timesteps=timesteps, sigmas=sigmas
        )
        # 4. Preprocess the image (B, 3, H, W) (or latents) and the mask (B, 1, H, W), cropped if asked
        init_image, mask, crop = inpaint.preprocess(
            images, masks, height=height, width=width, padding_mask_crop=padding_mask_crop
        )
        # 5. Starting latents, their noise and the image's latents; the mask (and masked-image latents) at latent
        # size; the VAE in float32 where it needs it
        with vae_codec.upcast_if_forced(self.vae):
            latents, noise, image_latents = inpaint.start_latents(
                init_image, timesteps[:1], batch, strength=strength, latents=latents, generator=generator,
                dtype=dtype, height=height, width=width,
            )
            extras = inpaint.mask_extras(init_image, mask, masked_latents_or_stand_in(self.vae, init_image,
                                         masked_image_latents), batch, generator=generator, dtype=dtype, guided=guided)
        if denoising_start is not None:
            latents = image_latents  # continue from the image's (the base model's) latents, no noise added
        # 6. Conditioning: text, micro-conditioning, IP-Adapter images, mask and masked-image latents
        cond = self.image_conditioning(embeds, micro, latents, cross_attention_kwargs,
                                       ip_adapter=(ip_adapter_image, ip_adapter_image_embeds))  # fmt: skip
        cond.extra_channels = extras.channels()
        # 7. Denoise (a 4-channel UNet gets the known area blended back after each step)
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=extras.shown_to(callback_on_step_end, cond),
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            after_step=inpaint.blend_hooks(timesteps, extras, noise, image_latents, guided=guided),
        )
        # 8. Decode (float32 VAE where needed), convert, paste the crop back into the whole image
        output = self.finish(latents, output_type, return_dict=True)
        output.images = paste_back(output.images, images, masks, crop)
        return output if return_dict else (output.images,)

    def inpaint_stages(self) -> InpaintStages:
        return InpaintStages(self.vae, self.scheduler, self.unet, self.device)

    def check_inpaint_inputs(self, inpaint: InpaintStages, image, mask_image, masked_image_latents, *, strength: float,
                             **kwargs) -> tuple[image_stages.ImageBatch, image_stages.ImageBatch]:  # fmt: skip
        """Inpainting's checks (a 4-channel UNet may start from the base's latents); returns the image (or
        latents) and the mask as PIL images or tensors."""
        if inpaint.inpainting_unet and sdxl_stages.is_fraction(self.denoising_start) and strength == 1.0:
            raise ValueError("denoising_start with an inpainting UNet starts from the image: use strength < 1")
        return inpaint.check_inputs(image, mask_image, masked_image_latents, pipeline=type(self).__name__,
                                    plain_unet_takes_latents=True, **kwargs)  # fmt: skip


def masked_latents_or_stand_in(vae, init_image: torch.Tensor, masked_image_latents: torch.Tensor | None):
    """`masked_image_latents`, or, when `image` is latents (the refiner continuing the base's), zeros: there is no
    masked image to encode, and the 4-channel UNet that takes latents reads only the mask."""
    if masked_image_latents is None and init_image.shape[1] == vae.config.latent_channels:
        return torch.zeros_like(init_image[:1])  # (1, 4, h, w), never read
    return masked_image_latents

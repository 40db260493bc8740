"""Stable Diffusion 1.x / 2.x inpainting: repaint the white part of a mask, keep the black part.

Two kinds of UNet work: inpainting UNets (9 input channels: latents + mask + masked-image latents, as
sd-v1-5-inpainting and stable-diffusion-2-inpainting) and plain text-to-image UNets (4 channels), for which
the known area is blended back in latent space after every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch

from stablepipe.image import ImageInput
from stablepipe.pipelines import arguments, image_stages, stages, vae_codec
from stablepipe.pipelines.base import StableDiffusionPipelineOutput, diffusers_call
from stablepipe.pipelines.denoising import Conditioning, StepHook
from stablepipe.pipelines.image_processor import VaeImageProcessor
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase
from stablepipe.random import Generator


class MaskProcessorMixin:
    """diffusers' `pipe.mask_processor` of the inpainting pipelines: masks as a call reads them."""

    @property
    def mask_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(self.image_processor.vae_scale_factor, mask=True)


class StableDiffusionInpaintPipeline(MaskProcessorMixin, StableDiffusionBase):
    """Inpainting with a 9-channel inpainting UNet or a 4-channel text-to-image UNet."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

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
            channels = vae.config.latent_channels
            image_stages.check_unet_channels(unet, [2 * channels + 1, channels], type(self).__name__)
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
        mask_image: ImageInput | None = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
        height, width = self.default_size(height, width)
        image_stages.check_schedule(num_inference_steps, strength, timesteps=timesteps, sigmas=sigmas)
        batch = stages.prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        inpaint = self.inpaint_stages()
        images, masks = inpaint.check_inputs(
            image, mask_image, masked_image_latents, height=height, width=width, batch=batch, generator=generator,
            padding_mask_crop=padding_mask_crop, output_type=output_type, pipeline=type(self).__name__,
        )
        # 2. Preprocess the image (B, 3, H, W) and the mask (B, 1, H, W), cropped to the masked region if asked
        init_image, mask, crop = inpaint.preprocess(
            images, masks, height=height, width=width, padding_mask_crop=padding_mask_crop
        )
        # 3. Encode the prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        # 4. Timesteps, the first (1 - strength) of them skipped
        timesteps, num_inference_steps = image_stages.strength_schedule(
            self.scheduler, num_inference_steps, strength, device, timesteps=timesteps, sigmas=sigmas
        )
        # 5. Starting latents, the noise in them and (4-channel UNet) the image's clean latents
        latents, noise, image_latents = inpaint.start_latents(
            init_image, timesteps[:1], batch, strength=strength, latents=latents, generator=generator,
            dtype=prompt_embeds.dtype, height=height, width=width,
        )
        # 6. Mask and masked-image latents, at latent size
        guided = self.do_classifier_free_guidance
        extras = inpaint.mask_extras(
            init_image, mask, masked_image_latents, batch, generator=generator, dtype=prompt_embeds.dtype, guided=guided
        )
        unet_kwargs = self.unet_kwargs(batch, cross_attention_kwargs, ip_adapter_image, ip_adapter_image_embeds)
        cond = Conditioning(prompt_embeds, negative_prompt_embeds, unet_kwargs, extra_channels=extras.channels())
        # 7. Denoise (a 4-channel UNet gets the known area blended back after each step)
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=extras.shown_to(callback_on_step_end, cond),
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            after_step=inpaint.blend_hooks(timesteps, extras, noise, image_latents, guided=guided),
        )
        # 8. Decode, check, convert; paste the crop back into the whole image
        output = self.finish(latents, output_type, return_dict=True)
        output.images = paste_back(output.images, images, masks, crop)
        return output if return_dict else (output.images, output.nsfw_content_detected)

    def inpaint_stages(self) -> InpaintStages:
        """Inpainting's stages on this pipeline's VAE, scheduler and UNet."""
        return InpaintStages(self.vae, self.scheduler, self.unet, self.device)

    @property
    def inpainting_unet(self) -> bool:
        """True for a 9-channel inpainting UNet, False for a plain 4-channel one."""
        return self.inpaint_stages().inpainting_unet


@dataclasses.dataclass(frozen=True)
class InpaintStages:
    """Inpainting's own stages on explicit models, shared by SD and SDXL inpainting: the input checks, the image
    and mask preprocessing, the starting latents, the mask (and masked-image latents) the UNet reads, the blend
    hook of a 4-channel UNet and the crop pasted back. SDXL wraps the VAE calls in its float32 upcast."""

    vae: Any
    scheduler: Any
    unet: Any
    device: torch.device

    @property
    def inpainting_unet(self) -> bool:
        """True for a 9-channel inpainting UNet, False for a plain 4-channel one."""
        return self.unet.config.in_channels != self.vae.config.latent_channels

    @property
    def scale(self) -> int:
        return vae_codec.scale_factor(self.vae)

    def check_inputs(
        self, image, mask_image, masked_image_latents, *, height: int, width: int, batch: int, generator: Generator,
        padding_mask_crop: int | None, output_type: str, pipeline: str, plain_unet_takes_latents: bool = False,
    ) -> tuple[image_stages.ImageBatch, image_stages.ImageBatch]:
        """The checks that need no model run; returns the image (or latents) and the mask as PIL images or
        tensors. `plain_unet_takes_latents`: a 4-channel UNet may start from latents without masked-image
        latents (SDXL's refiner continuing the base's latents)."""
        stages.check_size(height, width, multiple=self.scale)
        channels = self.vae.config.latent_channels
        image_stages.check_unet_channels(self.unet, [2 * channels + 1, channels], pipeline)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one or one per image")
        if padding_mask_crop is not None:
            check_padding_mask_crop(image, mask_image, padding_mask_crop, output_type)
        images = image_stages.load_images(image, latent_channels=channels)
        masks = image_stages.load_images(mask_image, kind="mask")
        image_stages.check_mask_matches_image(masks, images, latent_channels=channels, scale=self.scale)
        if masked_image_latents is not None:
            check_masked_image_latents(masked_image_latents, (channels, height // self.scale, width // self.scale))
        elif isinstance(images, torch.Tensor) and images.shape[1] == channels:
            if self.inpainting_unet or not plain_unet_takes_latents:
                raise ValueError("`image` was given as latents; pass `masked_image_latents` too (masking needs pixels)")
        return images, masks

    def preprocess(
        self, images: image_stages.ImageBatch, masks: image_stages.ImageBatch, *, height: int, width: int,
        padding_mask_crop: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, image_stages.Box | None]:
        """The image (B, 3, H, W) in [-1, 1] (or latents), the mask (B, 1, H, W) and the crop box, both cropped
        to the masked region first when `padding_mask_crop` asks (else the box is None)."""
        crop = None
        if padding_mask_crop is not None:
            crop = image_stages.mask_crop_region(masks[0], width, height, pad=padding_mask_crop)
        size = dict(height=height, width=width, multiple=self.scale, crop=crop)
        init_image = image_stages.preprocess_image(images, latent_channels=self.vae.config.latent_channels, **size)
        return init_image, image_stages.preprocess_mask(masks, **size), crop

    def start_latents(
        self, init_image: torch.Tensor, timestep: torch.Tensor, batch: int, *, strength: float,
        latents: torch.Tensor | None, generator: Generator, dtype: torch.dtype, height: int, width: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(starting latents, their noise, the image's clean latents or None), each (batch, 4, h, w)."""
        channels = self.vae.config.latent_channels
        image_latents = None
        if not self.inpainting_unet or (latents is None and strength < 1.0):
            image = init_image.to(device=self.device, dtype=dtype)
            if image.shape[1] != channels:
                image = vae_codec.encode_images(self.vae, image, generator=generator)
            image_latents = image_stages.repeat_to_batch(image, batch, what="images")
        shape = (batch, channels, height // self.scale, width // self.scale)
        start, noise = image_stages.inpaint_start_latents(
            self.scheduler, shape, image_latents=image_latents, timestep=timestep, full_strength=strength == 1.0,
            generator=generator, latents=latents, dtype=dtype, device=self.device,
        )
        return start, noise, image_latents

    def mask_extras(
        self, init_image: torch.Tensor, mask: torch.Tensor, masked_image_latents: torch.Tensor | None, batch: int,
        *, generator: Generator, dtype: torch.dtype, guided: bool,
    ) -> image_stages.UNetExtras:
        """The mask (and, for an inpainting UNet, the masked image's latents) at latent size, doubled when
        `guided`, for the UNet (`extras.channels()`: (2B, 1 + 4, h, w) or None) and the callbacks."""
        latent_size = (mask.shape[2] // self.scale, mask.shape[3] // self.scale)
        if masked_image_latents is None:
            masked = (init_image * (mask < 0.5)).to(device=self.device, dtype=dtype)  # (B, 3, H, W), masked area 0
            if self.inpainting_unet:
                masked_image_latents = vae_codec.encode_images(self.vae, masked, generator=generator)
            else:  # a 4-channel UNet does not use them, but diffusers draws their sample: keep the generator in step
                vae_codec.skip_encoder_sample(self.vae, masked, generator=generator, scale=self.scale)
        mask, masked_latents = image_stages.mask_conditioning(
            mask, masked_image_latents, batch, latent_size=latent_size, dtype=dtype, device=self.device
        )
        tensors = {"mask": image_stages.double_for_guidance(mask, guided)}
        if self.inpainting_unet:
            tensors["masked_image_latents"] = image_stages.double_for_guidance(masked_latents, guided)
        return image_stages.UNetExtras(tensors, concatenated=self.inpainting_unet)

    def blend_hooks(
        self, timesteps: torch.Tensor, extras: image_stages.UNetExtras, noise: torch.Tensor,
        image_latents: torch.Tensor | None, *, guided: bool,
    ) -> tuple[StepHook, ...]:
        """`run_denoise`'s `after_step` hooks: for a 4-channel UNet, the known area back from the image after
        each step, noised to the next timestep (the mask is read each step: a callback may replace it); none
        for an inpainting UNet."""
        if self.inpainting_unet:
            return ()

        def blend(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            mask = extras.tensors["mask"]
            mask = mask.chunk(2)[0] if guided else mask  # (B, 1, h, w)
            upcoming = timesteps[i + 1 : i + 2] if i < len(timesteps) - 1 else None
            return image_stages.blend_known_region(self.scheduler, latents, mask, image_latents, noise, upcoming)

        return (blend,)


def paste_back(
    generated: list, images: image_stages.ImageBatch, masks: image_stages.ImageBatch, crop: image_stages.Box | None
) -> list:
    """The generated images, pasted back into the whole image where `padding_mask_crop` cropped it."""
    return generated if crop is None else image_stages.paste_crop_back(generated, images[0], masks[0], crop)


def check_padding_mask_crop(image, mask_image, padding_mask_crop, output_type: str) -> None:
    if not isinstance(padding_mask_crop, int) or isinstance(padding_mask_crop, bool) or padding_mask_crop < 0:
        raise ValueError(f"padding_mask_crop must be a number of pixels >= 0, got {padding_mask_crop!r}")
    for name, value in (("image", image), ("mask_image", mask_image)):
        if not isinstance(value, PIL.Image.Image):
            raise ValueError(f"padding_mask_crop works on one PIL image and mask; {name} is a {type(value).__name__}")
    if output_type != "pil":
        raise ValueError(f"padding_mask_crop pastes into the PIL image: output_type must be 'pil', not {output_type!r}")


def check_masked_image_latents(masked_image_latents, latent_size: tuple[int, int, int]) -> None:
    shape = tuple(getattr(masked_image_latents, "shape", ()))
    if not isinstance(masked_image_latents, torch.Tensor) or len(shape) != 4 or shape[1:] != latent_size:
        raise ValueError(
            f"masked_image_latents must be a tensor (B, {latent_size[0]}, {latent_size[1]}, {latent_size[2]}) "
            f"(the masked image's VAE latents at height x width); got {shape or type(masked_image_latents).__name__}"
        )

"""Image variation: Stable Diffusion conditioned on a CLIP image embedding instead of a text prompt.

The checkpoints (lambdalabs/sd-image-variations-diffusers) replace the text encoder and tokenizer with a
`transformers` CLIPVisionModelWithProjection (`image_encoder/`); its projected embedding, one token per
image, is the UNet's cross-attention context, and guidance pushes away from an all-zeros embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch

from stablepipe.pipelines import arguments, stages
from stablepipe.pipelines.base import StableDiffusionPipelineOutput
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase
from stablepipe.random import Generator

VariationImage = PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor


def clip_pixel_values(feature_extractor, image: VariationImage, *, image_size: int) -> torch.Tensor:
    """The input image(s) as CLIP pixel values (B, 3, S, S).

    PIL images go through the CLIPImageProcessor (resize, center crop, normalise), as in diffusers; a tensor
    is taken as pixel values that were already processed that way.
    """
    if isinstance(image, torch.Tensor):
        pixels = image[None] if image.ndim == 3 else image  # (B, 3, S, S)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (image_size, image_size):
            raise ValueError(
                f"a tensor `image` is used as CLIP pixel values of shape (B, 3, {image_size}, {image_size}), already "
                f"processed by the CLIPImageProcessor; got {tuple(image.shape)}. Pass PIL images to have them processed"
            )
        return pixels
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(x, PIL.Image.Image) for x in images):
        got = [type(x).__name__ for x in images] if isinstance(image, list) else type(image).__name__
        raise TypeError(
            f"`image` must be a PIL image, a non-empty list of PIL images, or a tensor of CLIP pixel values; got {got}"
        )
    if feature_extractor is None:
        raise ValueError(
            "this pipeline has no feature_extractor (CLIPImageProcessor) to prepare PIL images; load one with the "
            "pipeline, or pass `image` as a tensor of CLIP pixel values"
        )
    return feature_extractor(images=images, return_tensors="pt").pixel_values


class StableDiffusionImageVariationPipeline(StableDiffusionBase):
    """Variations of an image with Stable Diffusion, conditioned on its CLIP image embedding."""

    image_tensors_are_clip_pixels = True  # a tensor `image` is the feature extractor's output (arguments.py)
    _optional_components = ("safety_checker",)  # as diffusers: the feature extractor prepares the image
    _callback_tensor_inputs = ("latents",)
    _latent_unet = True

    def __init__(
        self,
        vae,
        image_encoder,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker: bool = True,
    ):
        self.check_safety_components(safety_checker, feature_extractor, warn_if_off=requires_safety_checker)
        self.register_modules(
            vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor,
        )
        self.requires_safety_checker = requires_safety_checker

    def encode_image(
        self, image: VariationImage, device: torch.device, num_images_per_prompt: int, do_classifier_free_guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image embeddings (B * n, 1, D) and, with guidance, the all-zeros unconditional embeddings."""
        dtype = next(self.image_encoder.parameters()).dtype
        pixels = clip_pixel_values(self.feature_extractor, image, image_size=self.image_encoder.config.image_size)
        embeds = self.image_encoder(pixels.to(device=device, dtype=dtype)).image_embeds  # (B, D)
        embeds = stages.repeat_per_image(embeds[:, None], num_images_per_prompt)  # (B * n, 1, D)
        return embeds, torch.zeros_like(embeds) if do_classifier_free_guidance else None

    @torch.no_grad()
    @arguments.checked_call
    def __call__(
        self,
        image: VariationImage,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
        callback_steps: int = 1,
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
        stages.check_size(height, width)
        stages.check_steps(num_inference_steps, None, None)
        stages.check_callback_steps(callback_steps)
        # 2. Encode the image
        image_embeds, negative_embeds = self.encode_image(
            image, device, num_images_per_prompt, self.do_classifier_free_guidance
        )
        batch = image_embeds.shape[0]
        # 3. Timesteps
        timesteps, num_inference_steps = stages.retrieve_timesteps(self.scheduler, num_inference_steps, device)
        # 4. Initial noise
        latents = self.initial_noise(
            batch, height, width, dtype=image_embeds.dtype, generator=generator, latents=latents,
            channels=self.unet.config.in_channels,
        )
        # 5. Denoise
        latents = self.run_denoise(
            latents, timesteps, Conditioning(image_embeds, negative_embeds), num_inference_steps=num_inference_steps,
            generator=generator, eta=eta, callback=callback, callback_steps=callback_steps,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 6. Decode, check, convert
        return self.finish(latents, output_type, return_dict)

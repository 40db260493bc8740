"""Stable Diffusion 2 depth-to-image: image-to-image that keeps the picture's depth layout.

The UNet (stable-diffusion-2-depth layout) takes 5 input channels: the latents and a depth map at latent
size, scaled to [-1, 1]. The depth comes from a `transformers` DPT model (`depth_estimator`, with its
`feature_extractor`, a DPTImageProcessor), or from the `depth_map` the caller gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from stablepipe.image import ImageInput, pil_to_rgb
from stablepipe.pipelines import arguments, image_stages
from stablepipe.pipelines.base import StableDiffusionPipelineOutput, diffusers_call, processor_kwargs
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase
from stablepipe.random import Generator

DEPTH_CHECKPOINT = "stabilityai/stable-diffusion-2-depth"


class StableDiffusionDepth2ImgPipeline(StableDiffusionBase):
    """Depth-conditioned image-to-image. Runs no safety checker (as in diffusers)."""

    _optional_components = ("depth_estimator", "feature_extractor", "safety_checker", "image_encoder")
    _config_keys = ()
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")
    safety_checker = None  # `feature_extractor` is DPT's processor here, so a CLIP safety checker cannot run

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        depth_estimator=None,
        feature_extractor=None,
        safety_checker=None,
        image_encoder=None,
    ):
        """`safety_checker` and `image_encoder` are accepted so that `StableDiffusionDepth2ImgPipeline(**other
        .components)` works; they are not used."""
        image_stages.check_unet_channels(unet, [vae.config.latent_channels + 1], type(self).__name__)
        if safety_checker is not None:
            self.warn_once("StableDiffusionDepth2ImgPipeline runs no safety checker (as in diffusers); it is ignored")
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            depth_estimator=depth_estimator, feature_extractor=feature_extractor,
        )

    @torch.no_grad()
    @arguments.checked_call
    @diffusers_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        depth_map: torch.Tensor | np.ndarray | PIL.Image.Image | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
        images = self.check_inputs(image, depth_map, strength, num_inference_steps)
        # 2. Preprocess the image: (B, 3, H, W) in [-1, 1], or latents
        channels = self.vae.config.latent_channels
        init_image = image_stages.preprocess_image(images, multiple=self.vae_scale_factor, latent_channels=channels)
        # 3. Encode the prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        batch, dtype = prompt_embeds.shape[0], prompt_embeds.dtype
        # 4. Depth at latent size in [-1, 1]: estimated with DPT, or the given depth_map
        depth = self.depth_condition(images, init_image, depth_map, batch, dtype=dtype)  # (B, 1, h, w)
        extras = image_stages.UNetExtras(
            {"depth_mask": image_stages.double_for_guidance(depth, self.do_classifier_free_guidance)}
        )
        cond = Conditioning(
            prompt_embeds, negative_prompt_embeds, processor_kwargs(cross_attention_kwargs),
            extra_channels=extras.channels(),
        )
        # 5. Timesteps, the first (1 - strength) of them skipped
        timesteps, num_inference_steps = image_stages.strength_schedule(
            self.scheduler, num_inference_steps, strength, device
        )
        # 6. The image's latents, noised to the first timestep
        latents = image_stages.noised_image_latents(
            self.vae, self.scheduler, init_image, batch, timesteps[:1], generator=generator, dtype=dtype, device=device
        )
        # 7. Denoise with the depth as extra UNet input
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback_on_step_end=extras.shown_to(callback_on_step_end, cond),
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 8. Decode, convert
        output = self.finish(latents, output_type, return_dict=True)
        return output if return_dict else (output.images,)

    def check_inputs(self, image, depth_map, strength: float, num_inference_steps: int) -> image_stages.ImageBatch:
        """The checks that need no model run (after `begin_call`'s); returns the image as RGB PIL images or a
        tensor."""
        image_stages.check_schedule(num_inference_steps, strength)
        channels = self.vae.config.latent_channels
        image_stages.check_unet_channels(self.unet, [channels + 1], type(self).__name__)
        images = image_stages.load_images(image, latent_channels=channels)
        if depth_map is None and (self.depth_estimator is None or self.feature_extractor is None):
            raise ValueError(
                "no depth: this pipeline has no depth_estimator / feature_extractor (DPT); pass `depth_map=`, "
                f"or load a depth checkpoint that includes them, e.g. {DEPTH_CHECKPOINT}"
            )
        if depth_map is None and isinstance(images, torch.Tensor) and images.shape[1] == channels:
            raise ValueError("`image` was given as latents, from which DPT cannot see depth; pass `depth_map=` too")
        return images

    def depth_condition(
        self, images: image_stages.ImageBatch, init_image: torch.Tensor, depth_map, batch: int, *, dtype: torch.dtype
    ) -> torch.Tensor:
        """The UNet's depth input (batch, 1, h, w) in [-1, 1] at latent size: `depth_map`, or DPT's estimate."""
        channels = self.vae.config.latent_channels
        latent_size = init_image.shape[-2:] if init_image.shape[1] == channels else (
            init_image.shape[2] // self.vae_scale_factor, init_image.shape[3] // self.vae_scale_factor)
        depth = self.estimate_depth(images, dtype=dtype) if depth_map is None else depth_to_tensor(depth_map)
        depth = normalize_depth(depth.to(self.device), latent_size).to(dtype)  # (n, 1, h, w)
        return image_stages.repeat_to_batch(depth, batch, what="depth maps")

    def estimate_depth(self, images: image_stages.ImageBatch, *, dtype: torch.dtype) -> torch.Tensor:
        """Relative inverse depth (B, 1, H', W') from the DPT model (Ranftl et al. 2021)."""
        if isinstance(images, torch.Tensor):  # pixels in [0, 1] (or [-1, 1]) -> what the processor expects
            pixels = images if images.min() >= 0 else images / 2 + 0.5
            arrays = list(pixels.permute(0, 2, 3, 1).float().cpu().numpy())  # (H, W, 3) each
            inputs = self.feature_extractor(images=arrays, do_rescale=False, return_tensors="pt")
        else:
            inputs = self.feature_extractor(images=images, return_tensors="pt")
        pixel_values = inputs.pixel_values.to(device=self.device, dtype=dtype)  # (B, 3, S, S)
        half = dtype in (torch.float16, torch.bfloat16)  # DPT-Hybrid's batch norms need autocast in half precision
        with torch.autocast(self.device.type, dtype=dtype) if half else contextlib.nullcontext():
            return self.depth_estimator(pixel_values).predicted_depth.unsqueeze(1)  # (B, 1, H', W')


def depth_to_tensor(depth_map: torch.Tensor | np.ndarray | PIL.Image.Image) -> torch.Tensor:
    """A depth map as (B, 1, H, W) floats: a tensor or array (H, W), (B, H, W) or (B, 1, H, W), or a PIL image
    (16-bit depth PNGs keep their precision)."""
    if isinstance(depth_map, PIL.Image.Image):
        image = depth_map if depth_map.mode in ("I", "F") or depth_map.mode.startswith("I;16") else pil_to_rgb(
            depth_map).convert("L")
        depth_map = np.asarray(image, dtype=np.float32)
    if isinstance(depth_map, np.ndarray):
        depth_map = torch.from_numpy(np.ascontiguousarray(depth_map))
    if not isinstance(depth_map, torch.Tensor) or depth_map.ndim not in (2, 3, 4):
        shape = tuple(getattr(depth_map, "shape", ())) or type(depth_map).__name__
        raise ValueError(
            f"depth_map must be a tensor, array or PIL image (H, W), (B, H, W) or (B, 1, H, W); got {shape}"
        )
    depth = depth_map.float() if not depth_map.is_floating_point() else depth_map
    if depth.ndim == 4 and depth.shape[1] != 1:
        raise ValueError(f"depth_map (B, C, H, W) must have one channel, got shape {tuple(depth.shape)}")
    return depth[None, None] if depth.ndim == 2 else depth[:, None] if depth.ndim == 3 else depth


def normalize_depth(depth: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """(B, 1, H, W) depth -> (B, 1, h, w) at latent size (bicubic), each map min-max scaled to [-1, 1]."""
    depth = F.interpolate(depth.float(), size=tuple(latent_size), mode="bicubic", align_corners=False)
    low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    spread = torch.where(high > low, high - low, torch.ones_like(high))  # a flat map becomes all -1, not NaN
    return 2.0 * (depth - low) / spread - 1.0

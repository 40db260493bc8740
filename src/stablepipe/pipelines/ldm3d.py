"""LDM3D: an RGB image and its depth map from one prompt, panoramas, and the RGB-D upscaler.

LDM3D (Stan et al. 2023, arXiv:2305.10853) is Stable Diffusion whose VAE encodes and decodes RGB and depth
together: Intel/ldm3d-4c decodes 4 channels (RGB + depth), the original Intel/ldm3d 6 (RGB + a 16-bit depth
packed into 3 "RGB-like" channels). Text-to-image is SD text-to-image; only the last stage differs, which
splits the decoded channels into `.rgb` and `.depth`. Intel/ldm3d-pano (LDM3D-VR, arXiv:2311.03226) is the
same pipeline at 1024x512; `circular_padding=True` makes its left and right edges join (see
`horizontal_wrap`). The upscaler (Intel/ldm3d-sr) is below, after the text-to-image pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from stablepipe.image import ImageInput, denormalize, pil_to_pt, postprocess
from stablepipe.models.resnet import Downsample2D
from stablepipe.models.safety import run_safety_checker
from stablepipe.outputs import BaseOutput
from stablepipe.pipelines import arguments, image_stages, stages, upscale, vae_codec
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase, StableDiffusionPipeline
from stablepipe.random import Generator

RGBD_CHECKPOINTS = "Intel/ldm3d-4c (or Intel/ldm3d, Intel/ldm3d-pano)"


@dataclasses.dataclass
class LDM3DPipelineOutput(BaseOutput):
    """`rgb`: PIL RGB images, an array (B, H, W, 3) or a tensor (B, 3, H, W) in [0, 1] (latents for
    output_type="latent"); `depth`: 16-bit grayscale PIL images ("I;16"), an array (B, H, W, 1) or a tensor
    (B, 1, H, W) in [0, 1] (None for latents); `nsfw_content_detected`: one flag per image, or None."""

    rgb: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    depth: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    nsfw_content_detected: list[bool] | None = None


# ---- RGB + depth out of the VAE ----------------------------------------------------------------------------


def check_rgbd_vae(vae, pipeline: str) -> None:
    """LDM3D's VAE decodes 4 channels (RGB + depth) or 6 (RGB + RGB-like depth); a plain SD VAE decodes 3."""
    channels = vae.config.out_channels
    if channels not in (4, 6):
        raise ValueError(
            f"{pipeline} needs an LDM3D VAE that decodes RGB and depth together (4 or 6 output channels), but this "
            f"VAE decodes {channels}; load an LDM3D checkpoint such as {RGBD_CHECKPOINTS}"
        )


def rgblike_to_depth(packed: torch.Tensor) -> torch.Tensor:
    """The original LDM3D's depth: a 16-bit value packed into an RGB-like image (LDM3D, arXiv:2305.10853, Fig. 1),
    high byte in channel 1 and low byte in channel 2 (diffusers' layout): (B, 3, H, W) -> (B, 1, H, W) in [0, 1]."""
    high, low = (packed[:, 1:2] * 255).round(), (packed[:, 2:3] * 255).round()  # (B, 1, H, W) bytes
    return (high * 256 + low) / 65535


def split_rgbd(decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded RGB-D in [0, 1] (B, 4 or 6, H, W) -> rgb (B, 3, H, W) and depth (B, 1, H, W)."""
    rgb, depth = decoded[:, :3], decoded[:, 3:]
    return rgb, depth if depth.shape[1] == 1 else rgblike_to_depth(depth)


def depth_to_pil(depth: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, 1) in [0, 1] -> 16-bit grayscale images (truncated to 0..65535, as diffusers does)."""
    pixels = (depth[..., 0] * 65535.0).astype(np.uint16)  # (B, H, W)
    return [PIL.Image.fromarray(p) for p in pixels]  # mode "I;16"


def postprocess_depth(depth: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
    """Depth in [0, 1] (B, 1, H, W) -> a tensor as is, an array (B, H, W, 1), or 16-bit PIL images."""
    if output_type == "pt":
        return depth
    array = postprocess(depth, "np", do_denormalize=[False] * len(depth))  # (B, H, W, 1)
    return array if output_type == "np" else depth_to_pil(array)


def check_rgbd_safety(pipe, rgbd: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
    """The safety checker looks at the RGB part (as in diffusers); a flagged image is blacked out in
    RGB and depth. (B, C, H, W) in [0, 1] -> (the same, flags)."""
    _, flags = run_safety_checker(
        pipe.safety_checker, pipe.feature_extractor, rgbd[:, :3], device=pipe.device, dtype=pipe.unet.dtype
    )
    if flags is not None:
        keep = torch.tensor([not flag for flag in flags], dtype=rgbd.dtype, device=rgbd.device)
        rgbd = rgbd * keep[:, None, None, None]
    return rgbd, flags


class RGBDFinish:
    """The last stage of both LDM3D pipelines: decode RGB-D, check, split, convert."""

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        if output_type == "latent":
            rgb, depth, flags = latents, None, None
        else:
            rgbd = denormalize(vae_codec.decode_latents(self.vae, latents))  # (B, 4 or 6, H, W) in [0, 1]
            rgbd, flags = check_rgbd_safety(self, rgbd)
            rgb, depth = split_rgbd(rgbd)  # (B, 3, H, W), (B, 1, H, W)
            rgb = postprocess(rgb, output_type, do_denormalize=[False] * len(rgb))
            depth = postprocess_depth(depth, output_type)
            watermarker = getattr(self, "watermarker", None)  # the upscaler's optional component, as in diffusers
            if watermarker is not None and output_type == "pil":
                rgb = watermarker.apply_watermark(rgb)
        if not return_dict:
            return (rgb, depth), flags
        return LDM3DPipelineOutput(rgb=rgb, depth=depth, nsfw_content_detected=flags)


# ---- panoramas: left and right edges that join ----------------------------------------------------------


@contextlib.contextmanager
def horizontal_wrap(*models: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside this block, every convolution of `models` pads left and right circularly (top and bottom
    with zeros as before): the networks see the image as a cylinder, as a 360-degree equirectangular
    panorama is, so the last column continues into the first. Convolutions, group norms and attention then
    all commute with horizontal rolls (by multiples of the downsampling), so no column is an edge.
    The same idea as "seamless tiling" in AUTOMATIC1111 / InvokeAI, restricted to the x axis."""
    undo = [wrap_module(m) for model in (models if enabled else ()) for m in model.modules()]
    try:
        yield
    finally:
        for restore in reversed(undo):
            if restore is not None:
                restore()


def wrap_module(module: torch.nn.Module):
    """Make one conv (or the VAE encoder's right-padding downsample) wrap horizontally; returns its undo."""
    if isinstance(module, Downsample2D) and module.padding == 0:
        return wrap_right_pad(module)
    if not isinstance(module, torch.nn.Conv2d) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    pad_h, pad_w = module.padding
    if pad_w == 0:
        return None
    module.padding = (pad_h, 0)
    handle = module.register_forward_pre_hook(
        lambda _, args: (F.pad(args[0], (pad_w, pad_w, 0, 0), mode="circular"), *args[1:])  # (B, C, H, W + 2p)
    )

    def restore() -> None:
        handle.remove()
        module.padding = (pad_h, pad_w)

    return restore


def wrap_right_pad(module: torch.nn.Module):
    """The LDM VAE encoder's downsample pads one zero column on the right; put the first column there."""
    handle = module.register_forward_pre_hook(
        lambda _, args: (torch.cat([args[0], args[0][..., :1]], dim=-1), *args[1:])  # (B, C, H, W + 1)
    )
    return handle.remove


# ---- text-to-image --------------------------------------------------------------------------------------------


class StableDiffusionLDM3DPipeline(RGBDFinish, StableDiffusionPipeline):
    """Text to RGB + depth with LDM3D (Intel/ldm3d-4c, Intel/ldm3d, Intel/ldm3d-pano): Stable Diffusion
    text-to-image whose VAE decodes RGB and depth together. Returns an `LDM3DPipelineOutput`."""

    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")

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
        """`image_encoder` (IP-Adapter) is accepted so that diffusers' components fit; it is not used."""
        check_rgbd_vae(vae, type(self).__name__)
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker=requires_safety_checker,
        )

    @torch.no_grad()
    @arguments.checked_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 49,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        *,
        circular_padding: bool = False,
        output_type: str = "pil",
        **kwargs,
    ) -> LDM3DPipelineOutput:
        """`StableDiffusionPipeline.__call__` with diffusers' LDM3D defaults (49 steps, guidance 5.0); every
        other argument is the same. `circular_padding=True` joins the left and right edges: for 360-degree
        panoramas (Intel/ldm3d-pano at width=1024, height=512)."""
        check_rgbd_vae(self.vae, type(self).__name__)
        with horizontal_wrap(self.unet, self.vae, enabled=circular_padding):
            return super().__call__(
                prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                output_type=output_type, **kwargs,
            )


# ---- the RGB-D upscaler: low-resolution inputs ---------------------------------------------------------------
#
# Intel/ldm3d-sr (LDM3D-VR, arXiv:2311.03226; its model card and diffusers' community reference pipeline): the
# low-res RGB and depth are resized to the target size, encoded together by the 4-channel LDM3D VAE, and the
# latents of that RGB-D image are concatenated with the noisy latents (a UNet of 4 + 4 input channels); the
# noise level is the UNet's class label, as in the x4 upscaler. Like the reference pipeline, the inputs go to
# the VAE in [0, 1] (RGB / 255, depth / 65535 for 16-bit maps) and the conditioning latents are not noised
# further: the DDPM `low_res_scheduler` is kept for checkpoint compatibility but, as there, adds no noise.

DEPTH_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def depth_pil_to_pt(image: PIL.Image.Image) -> torch.Tensor:
    """A depth map as (1, 1, H, W) in [0, 1]: 16-bit (and "I") maps / 65535, 8-bit gray / 255, float as is;
    color images become gray first."""
    scale = DEPTH_SCALE.get(image.mode)
    if scale is None:
        image, scale = image.convert("L"), 255.0
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / scale)[None, None]  # (1, 1, H, W)


def load_rgbd(rgb, depth) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images -> (n, 3, H, W) and depth maps -> (n, 1, H', W'), both in [0, 1], from PIL images, arrays or
    tensors (uint8 / uint16 pixels scaled; float arrays with negative values taken to be in [-1, 1])."""
    if rgb is None or depth is None:
        raise ValueError("give both `rgb` (the low-res images) and `depth` (their depth maps)")
    loaded = image_stages.load_images(rgb, kind="image", latent_channels=None)
    if isinstance(loaded, list) and len({image.size for image in loaded}) > 1:
        raise ValueError(f"the RGB images have different sizes {[image.size for image in loaded]}; give one size")
    rgb = pil_to_pt(loaded) if isinstance(loaded, list) else loaded  # (n, 3, H, W)
    items = list(depth) if isinstance(depth, list | tuple) else [depth]
    if all(isinstance(item, PIL.Image.Image) for item in items):
        depths = [depth_pil_to_pt(item) for item in items]
        if len({tuple(d.shape) for d in depths}) > 1:
            raise ValueError(f"the depth maps have different sizes {[tuple(d.shape[-2:]) for d in depths]}")
        depth = torch.cat(depths)  # (n, 1, H, W)
    else:
        depth = image_stages.load_images(depth, kind="mask")  # (n, 1, H, W): one channel, like a mask
    rgb, depth = (x if x.min() >= 0 else (x + 1) / 2 for x in (rgb.float(), depth.float()))
    if rgb.shape[0] != depth.shape[0]:
        raise ValueError(f"got {rgb.shape[0]} RGB images and {depth.shape[0]} depth maps; give one depth per image")
    return rgb, depth


def check_target_res(target_res, multiple: int) -> tuple[int, int]:
    """`target_res` is [height, width] (as diffusers' community pipeline), each a positive multiple of `multiple`."""
    if not isinstance(target_res, list | tuple) or len(target_res) != 2:
        raise ValueError(f"target_res must be [height, width], e.g. [1024, 1024], got {target_res!r}")
    stages.check_size(*target_res, multiple=multiple)
    return tuple(target_res)


def resize_rgbd(rgb: torch.Tensor, depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Both to (height, width), bilinear (antialiased when shrinking), joined: (n, 4, height, width) in [0, 1]."""
    resized = [F.interpolate(x, size=(height, width), mode="bilinear", antialias=True) for x in (rgb, depth)]
    return torch.cat(resized, dim=1).clamp(0, 1)  # (n, 4, H, W)


def rgbd_latents(vae, rgbd: torch.Tensor, *, generator) -> torch.Tensor:
    """The RGB-D image (n, 4, H, W) in [0, 1] encoded by the LDM3D VAE: scaled latents (n, 4, H/8, W/8),
    sampled from the encoder's distribution (with a list of generators, image i with generator i)."""
    if isinstance(generator, list) and len(generator) != rgbd.shape[0]:
        generator = generator[0]  # copies of one image share its encoding: draw it from the first generator
    return vae_codec.encode_images(vae, rgbd, generator=generator)


# ---- the RGB-D upscaler ---------------------------------------------------------------------------------------


class StableDiffusionUpscaleLDM3DPipeline(RGBDFinish, StableDiffusionBase):
    """RGB + depth super-resolution with LDM3D-SR (Intel/ldm3d-sr): the low-res pair, resized to `target_res`
    and encoded by the LDM3D VAE, conditions the UNet beside its latents. Returns an `LDM3DPipelineOutput`."""

    _optional_components = ("safety_checker", "feature_extractor", "watermarker")
    _config_keys = ("requires_safety_checker", "max_noise_level")

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        low_res_scheduler,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker: bool = True,
        watermarker=None,
        max_noise_level: int = 350,
    ):
        name = type(self).__name__
        check_rgbd_vae(vae, name)
        if vae.config.in_channels != 4:
            raise ValueError(f"{name} encodes RGB + depth as 4 channels, but this VAE takes {vae.config.in_channels}; "
                             "load Intel/ldm3d-sr")  # fmt: skip
        image_stages.check_unet_channels(unet, [2 * vae.config.latent_channels], name)
        if unet.config.get("num_class_embeds") is None:
            raise ValueError(f"{name} needs a UNet with a noise-level class embedding (num_class_embeds): "
                             "load Intel/ldm3d-sr")  # fmt: skip
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(low_res_scheduler=low_res_scheduler, watermarker=watermarker)
        self.max_noise_level = max_noise_level

    def check_inputs(self, prompt, prompt_embeds, rgb, depth, noise_level, target_res, callback_steps):
        """Every argument check, before any model runs; returns the loaded (rgb, depth) and (height, width)."""
        upscale.check_noise_level(noise_level, self.max_noise_level)
        if noise_level >= self.unet.config.num_class_embeds:
            raise ValueError(f"noise_level={noise_level} has no class embedding in this UNet "
                             f"(num_class_embeds={self.unet.config.num_class_embeds})")  # fmt: skip
        stages.check_callback_steps(callback_steps)
        size = check_target_res(target_res, self.vae_scale_factor)
        rgb, depth = load_rgbd(rgb, depth)
        upscale.check_image_batch(rgb.shape[0], stages.prompt_batch_size(prompt, prompt_embeds))
        return rgb, depth, size

    def rgbd_conditioning(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        rgbd: torch.Tensor,
        noise_level: int,
        *,
        generator: Generator,
        num_images_per_prompt: int,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> Conditioning:
        """The RGB-D image (1 or one per prompt, 4, H, W) encoded, as extra UNet channels in the prompts' order
        (p, p, q, q: image i goes with prompt i), and the noise level as class labels (the x4 upscaler's stage)."""
        prompts = prompt_embeds.shape[0] // num_images_per_prompt
        image_latents = rgbd_latents(self.vae, rgbd, generator=generator)  # (1 or P, 4, h, w)
        image_latents = image_stages.repeat_to_batch(image_latents, prompts, what="images")  # (P, 4, h, w)
        image_latents = image_latents.repeat_interleave(num_images_per_prompt, dim=0)  # (P * n, 4, h, w)
        level = torch.tensor([noise_level], dtype=torch.long, device=image_latents.device)  # (1,)
        return upscale.upscaler_conditioning(  # one image per prompt embedding already: repeated once
            prompt_embeds, negative_prompt_embeds, image_latents, level, num_images_per_prompt=1,
            cross_attention_kwargs=cross_attention_kwargs,
        )

    @torch.no_grad()
    @arguments.checked_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        rgb: ImageInput | None = None,
        depth: ImageInput | None = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        target_res: list[int] | tuple[int, int] = (1024, 1024),
        *,
        circular_padding: bool = False,
    ) -> LDM3DPipelineOutput:
        """Upscale `rgb` and its `depth` to `target_res` = [height, width]. `circular_padding=True` keeps the
        left and right edges of a 360-degree panorama joined (see `horizontal_wrap`)."""
        # 1. Check inputs
        device = self.begin_call({}, guidance_scale=guidance_scale, output_type=output_type)
        rgb, depth, (height, width) = self.check_inputs(prompt, prompt_embeds, rgb, depth, noise_level, target_res,
                                                        callback_steps)  # fmt: skip
        stages.check_steps(num_inference_steps, None, None)
        with horizontal_wrap(self.unet, self.vae, enabled=circular_padding):
            # 2. Encode the prompt
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
                negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
            )
            # 3. The low-res RGB-D at the target size, (n, 4, H, W) in [0, 1]
            rgbd = resize_rgbd(rgb, depth, height, width).to(device, prompt_embeds.dtype)
            # 4. Timesteps
            timesteps, num_inference_steps = stages.retrieve_timesteps(self.scheduler, num_inference_steps, device)
            # 5. Encode the RGB-D (the first random draw): conditioning channels, noise level as class labels
            cond = self.rgbd_conditioning(prompt_embeds, negative_prompt_embeds, rgbd, noise_level,
                                          generator=generator, num_images_per_prompt=num_images_per_prompt,
                                          cross_attention_kwargs=cross_attention_kwargs)  # fmt: skip
            # 6. Initial noise, (B * n, 4, H / 8, W / 8)
            latents = upscale.noise_beside_image(self, cond, generator=generator, latents=latents)
            # 7. Denoise
            latents = self.run_denoise(
                latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
                callback=callback, callback_steps=callback_steps,
            )
            # 8. Decode RGB-D, check, convert
            return self.finish(latents, output_type, return_dict)

"""The x4 upscaler (stabilityai/stable-diffusion-x4-upscaler), and the stages every upscaler shares.

low-res image -> `preprocess_low_res` -> `noise_low_res` (DDPM noise at `noise_level`) -> `low_res_conditioning`
(3 image channels beside the 4 latent ones, the noise level as class label) -> `denoise` (whole, or tile by tile
with `TiledUNet`) -> decode (whole, or with the VAE's tiled decode via `vae_tiling`) -> safety check -> images.

The x4 UNet denoises latents of the low-res image's own size, conditioned on that image; its VAE decodes them at
4x (three levels, scaling factor 0.08333). The LDM3D upscaler reuses these stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import PIL.Image
import torch

from stablepipe.image import ImageInput
from stablepipe.pipelines import arguments, image_stages, stages
from stablepipe.pipelines.base import StableDiffusionPipelineOutput
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.pipelines.stable_diffusion import StableDiffusionBase
from stablepipe.random import Generator, randn_tensor

X4_SCALING_FACTOR = 0.08333  # the x4 upscaler VAE's latent scale; diffusers forces it on any VAE given


# ---- checks ------------------------------------------------------------------------------------------------


def check_noise_level(noise_level: int, max_noise_level: int) -> None:
    """`noise_level` is a DDPM timestep of the low-res scheduler: an integer in [0, max_noise_level]."""
    if not isinstance(noise_level, numbers.Integral) or isinstance(noise_level, bool) or noise_level < 0:
        raise ValueError(f"noise_level must be an integer in [0, {max_noise_level}], got {noise_level!r}")
    if noise_level > max_noise_level:
        raise ValueError(
            f"noise_level={noise_level} is above this pipeline's max_noise_level={max_noise_level}; the UNet was "
            f"trained on noise levels up to {max_noise_level}: use a value in [0, {max_noise_level}] (default 20)"
        )


def load_low_res(image: ImageInput, *, pipeline: str) -> image_stages.ImageBatch:
    """The low-res input as PIL images or an RGB tensor; a 4-channel tensor is refused (it looks like latents)."""
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] == 4:
        raise ValueError(
            f"{pipeline} got a 4-channel tensor: it upscales RGB images (B, 3, H, W), not latents. Decode the "
            "latents first, or chain latents into StableDiffusionLatentUpscalePipeline instead"
        )
    return image_stages.load_images(image, kind="image", latent_channels=None)


def check_low_res_size(
    batch: image_stages.ImageBatch,
    *,
    minimum: int,
    pipeline: str,
    latent_channels: int | None = None,
    vae_scale_factor: int = 8,
) -> None:
    """The input (latents: their decoded size) must be at least `minimum` pixels on each side, for the UNet."""
    height, width = image_stages.pixel_size(batch, latent_channels=latent_channels, vae_scale_factor=vae_scale_factor)
    if height < minimum or width < minimum:
        raise ValueError(
            f"the image is {width}x{height} pixels, too small for {pipeline}: it needs at least {minimum}x{minimum}"
        )


def check_image_batch(images: int, prompts: int) -> None:
    if images not in (1, prompts):
        raise ValueError(f"got {images} images for {prompts} prompts; give one image, or one image per prompt")


def unet_minimum_size(unet) -> int:
    """The smallest input side the UNet can halve at every level: 2 ** (number of downsamplings)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


# ---- the low-resolution image ------------------------------------------------------------------------------


def floor_pil_to_multiple(batch: image_stages.ImageBatch, multiple: int) -> image_stages.ImageBatch:
    """PIL images whose sides are not multiples of `multiple` are resized down to the nearest ones, bicubic
    (diffusers' upscalers use a bicubic `VaeImageProcessor`); tensors are left to `preprocess_image`."""
    if not isinstance(batch, list):
        return batch
    height, width = image_stages.target_size(batch[0].height, batch[0].width, multiple=multiple)
    bicubic = PIL.Image.Resampling.BICUBIC
    return [im if im.size == (width, height) else im.resize((width, height), resample=bicubic) for im in batch]


def preprocess_low_res(batch: image_stages.ImageBatch, *, multiple: int, latent_channels: int | None = None):
    """Loaded images -> (B, 3, H, W) in [-1, 1], sides floored to `multiple`; latents pass through."""
    batch = floor_pil_to_multiple(batch, multiple)
    return image_stages.preprocess_image(batch, multiple=multiple, latent_channels=latent_channels)


def noise_low_res(
    low_res_scheduler, image: torch.Tensor, noise_level: int, *, generator: Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise the conditioning image to `noise_level`, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Ho et al. 2020,
    eq. 4), as the upscaler was trained (noise augmentation, Ho et al. 2021, "Cascaded Diffusion Models",
    sec. 4.2). Returns the noisy image (B, C, H, W) and the level as a (1,) long tensor. With a list of
    generators the first B draw the noise, one per image (diffusers' order)."""
    if isinstance(generator, list):
        if len(generator) < image.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {image.shape[0]} images; pass one or one per image")
        generator = generator[: image.shape[0]]
    level = torch.tensor([noise_level], dtype=torch.long, device=image.device)  # (1,)
    noise = randn_tensor(tuple(image.shape), generator=generator, device=image.device, dtype=image.dtype)
    return low_res_scheduler.add_noise(image, noise, level), level


def low_res_conditioning(
    image: torch.Tensor, noise_level: torch.Tensor, *, batch_size: int, num_images_per_prompt: int, copies: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy image as extra UNet channels and the noise level as class labels, one per UNet batch entry:
    (copies * batch_size * n, C, H, W) and (copies * batch_size * n,).

    The image batch is repeated whole (a, b, a, b, ...) `copies * n` times, as diffusers does, while prompt
    embeddings repeat per image (p, p, q, q): with several prompts and num_images_per_prompt > 1 images and
    prompts pair up in diffusers' order, kept for same-seed parity.
    """
    image = image_stages.repeat_to_batch(image, batch_size, what="images")  # (B, C, H, W)
    extra = torch.cat([image] * (copies * num_images_per_prompt))  # (copies * B * n, C, H, W)
    return extra, noise_level.repeat(extra.shape[0])


def upscaler_conditioning(
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    image: torch.Tensor,
    noise_level: torch.Tensor,
    *,
    num_images_per_prompt: int,
    cross_attention_kwargs: dict[str, Any] | None,
) -> Conditioning:
    """What the upscalers' UNets are conditioned on (the x4 and the LDM3D one): the prompt embeddings (B * n, L,
    D), `image` (1 or B, C, h, w) beside the latents as extra channels, repeated as `low_res_conditioning` says,
    and the noise level (1,) as class labels."""
    extra = {} if cross_attention_kwargs is None else {"cross_attention_kwargs": cross_attention_kwargs}
    cond = Conditioning(prompt_embeds, negative_prompt_embeds, extra)
    prompts = prompt_embeds.shape[0] // num_images_per_prompt
    cond.extra_channels, cond.unet_kwargs["class_labels"] = low_res_conditioning(
        image, noise_level, batch_size=prompts, num_images_per_prompt=num_images_per_prompt, copies=cond.copies
    )
    return cond


def noise_beside_image(pipe, cond: Conditioning, *, generator: Generator, latents: torch.Tensor | None):
    """The upscalers' initial noise (B, C_latent, h, w): one latent per prompt embedding, as large as the image
    beside it (`cond.extra_channels`, (copies * B, C, h, w)), drawn (or checked) by `pipe.initial_noise`."""
    scale = pipe.vae_scale_factor
    height, width = (side * scale for side in cond.extra_channels.shape[-2:])
    return pipe.initial_noise(cond.prompt_embeds.shape[0], height, width, dtype=cond.prompt_embeds.dtype,
                              generator=generator, latents=latents)  # fmt: skip


# ---- tiling --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Square UNet tiles of `size` latent pixels, each overlapping its neighbours by `overlap` pixels."""

    size: int
    overlap: int

    def spans(self, length: int) -> list[tuple[slice, torch.Tensor]]:
        """The tiles along one axis of `length`: (slice, 1-d blending weights) each; the last tile ends at
        `length`. Weights ramp linearly over `overlap` pixels on sides shared with another tile, else 1."""
        if length <= self.size:
            return [(slice(0, length), torch.ones(length))]
        stride = self.size - self.overlap
        starts = [*range(0, length - self.size, stride), length - self.size]
        ramp = torch.arange(1, self.overlap + 1, dtype=torch.float32) / (self.overlap + 1)  # (overlap,)
        spans = []
        for k, start in enumerate(starts):
            weights = torch.ones(self.size)
            if k > 0:
                weights[: self.overlap] = ramp
            if k < len(starts) - 1:
                weights[self.size - self.overlap :] = ramp.flip(0)
            spans.append((slice(start, start + self.size), weights))
        return spans


def tile_spec(tile_size: int | None, tile_overlap: int | None, *, scale: float = 1, multiple: int) -> TileSpec | None:
    """Check the user's tiling options (in input-image pixels) and convert them to latent pixels (`scale`
    latent pixels per input pixel). The tile must come out a multiple of `multiple` (the UNet's downsampling).
    `tile_overlap` defaults to a quarter of the tile."""
    if tile_size is None:
        if tile_overlap is not None:
            raise ValueError("tile_overlap needs tile_size; pass tile_size too, e.g. tile_size=128")
        return None
    unit = max(1, round(multiple / scale))
    if not isinstance(tile_size, int) or tile_size < unit or tile_size % unit:
        raise ValueError(f"tile_size must be a positive multiple of {unit} pixels, got {tile_size!r}; e.g. {8 * unit}")
    overlap = tile_size // 4 if tile_overlap is None else tile_overlap
    if not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise ValueError(f"tile_overlap must be an integer in [0, tile_size={tile_size}), got {tile_overlap!r}")
    return TileSpec(round(tile_size * scale), round(overlap * scale))


class TiledUNet:
    """Calls a UNet tile by tile over the latent grid and blends the predictions, for a peak memory of one tile.

    The per-tile predictions are averaged with linear-ramp weights where tiles overlap (MultiDiffusion, Bar-Tal
    et al. 2023, eq. 5, with feathered weights), at every denoising step, so seams are blended step by step and
    the random numbers are those of the untiled run. Called like the UNet: extra keyword arguments pass through.
    """

    def __init__(self, unet: Callable, spec: TileSpec):
        self.unet, self.spec = unet, spec

    def __call__(self, sample: torch.Tensor, timestep, *, encoder_hidden_states, return_dict: bool = False, **kw):
        height, width = sample.shape[-2:]
        out, total = None, sample.new_zeros(1, 1, height, width)
        for (rows, row_w), (cols, col_w) in itertools.product(self.spec.spans(height), self.spec.spans(width)):
            pred = self.unet(sample[:, :, rows, cols], timestep, encoder_hidden_states=encoder_hidden_states,
                             return_dict=False, **kw)[0]  # fmt: skip
            if out is None:
                out = sample.new_zeros(sample.shape[0], pred.shape[1], height, width)  # (B, C_out, H, W)
            weight = (row_w[:, None] * col_w[None, :]).to(sample)  # (h, w)
            out[:, :, rows, cols] += pred * weight
            total[:, :, rows, cols] += weight
        return (out / total,)


@contextlib.contextmanager
def vae_tiling(vae, spec: TileSpec | None) -> Iterator[None]:
    """Within the block, the VAE encodes and decodes in tiles of `spec` latent pixels (its blended tiled mode);
    its own tiling settings are restored after. `spec=None` leaves the VAE as it is."""
    if spec is None:
        yield
        return
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    saved = {name: getattr(vae, name) for name in names}
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling(tile_sample_min_size=spec.size * scale, tile_overlap_factor=spec.overlap / spec.size)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


# ---- the pipeline ----------------------------------------------------------------------------------------


class StableDiffusionUpscalePipeline(StableDiffusionBase):
    """Text-guided x4 super-resolution: a 7-channel UNet denoises latents beside the (noised) low-res image."""

    _optional_components = ("safety_checker", "feature_extractor", "watermarker")
    _config_keys = ("max_noise_level",)

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
        watermarker=None,
        max_noise_level: int = 350,
    ):
        image_stages.check_unet_channels(unet, [vae.config.latent_channels + 3], type(self).__name__)
        self.check_safety_components(safety_checker, feature_extractor, warn_if_off=False)
        if abs(vae.config.scaling_factor - X4_SCALING_FACTOR) > 1e-6:
            self.warn_once(
                f"this VAE's scaling_factor is {vae.config.scaling_factor}, not the x4 upscaler's {X4_SCALING_FACTOR}; "
                "stablepipe uses the VAE's own value (diffusers would replace it by 0.08333)"
            )
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, low_res_scheduler=low_res_scheduler,
            scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
            watermarker=watermarker,
        )
        self.max_noise_level = max_noise_level

    def check_inputs(self, prompt, image, noise_level, prompt_embeds, callback_steps, tile_size, tile_overlap):
        """Every argument check, before any model runs; returns the loaded images and the tiling spec."""
        name = type(self).__name__
        check_noise_level(noise_level, self.max_noise_level)
        levels = self.unet.config.num_class_embeds
        if levels is not None and noise_level >= levels:
            raise ValueError(f"noise_level={noise_level} has no class embedding in this UNet ({levels} levels)")
        stages.check_callback_steps(callback_steps)
        batch = load_low_res(image, pipeline=name)
        check_image_batch(image_stages.batch_length(batch), stages.prompt_batch_size(prompt, prompt_embeds))
        minimum = max(unet_minimum_size(self.unet), self.vae_scale_factor)
        check_low_res_size(batch, minimum=minimum, pipeline=name)
        return batch, tile_spec(tile_size, tile_overlap, multiple=unet_minimum_size(self.unet))

    @torch.no_grad()
    @arguments.checked_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
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
        clip_skip: int | None = None,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> StableDiffusionPipelineOutput:
        """Upscale `image` 4x. `tile_size` (low-res pixels, a multiple of the UNet's 2^levels) runs the UNet and
        the VAE decode in tiles overlapping by `tile_overlap` (default tile_size / 4), blended at the seams."""
        # 1. Check inputs
        device = self.begin_call({}, guidance_scale=guidance_scale, output_type=output_type)
        batch, tiles = self.check_inputs(prompt, image, noise_level, prompt_embeds, callback_steps, tile_size,
                                         tile_overlap)  # fmt: skip
        stages.check_steps(num_inference_steps, None, None)
        # 2. Encode the prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        # 3. The low-res image, (B_img, 3, H, W) in [-1, 1]
        low_res = preprocess_low_res(batch, multiple=self.vae_scale_factor).to(device, prompt_embeds.dtype)
        # 4. Timesteps
        timesteps, num_inference_steps = stages.retrieve_timesteps(self.scheduler, num_inference_steps, device)
        # 5. Noise the low-res image; conditioning channels and class labels
        noisy, level = noise_low_res(self.low_res_scheduler, low_res, noise_level, generator=generator)
        cond = upscaler_conditioning(prompt_embeds, negative_prompt_embeds, noisy, level,
                                     num_images_per_prompt=num_images_per_prompt,
                                     cross_attention_kwargs=cross_attention_kwargs)  # fmt: skip
        # 6. Initial noise, (B * n, 4, H, W)
        latents = noise_beside_image(self, cond, generator=generator, latents=latents)
        # 7. Denoise, whole or tile by tile
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, generator=generator, eta=eta,
            callback=callback, callback_steps=callback_steps, model=TiledUNet(self.unet, tiles) if tiles else None,
        )
        # 8. Decode (tiled too), check, convert
        with vae_tiling(self.vae, tiles):
            output = self.finish(latents, output_type, return_dict=True)
        return self.watermark(output, output_type, return_dict)

    def watermark(self, output: StableDiffusionPipelineOutput, output_type: str, return_dict: bool):
        """Apply the optional `watermarker` to PIL outputs, as diffusers does."""
        if output_type == "pil" and self.watermarker is not None:
            output.images = self.watermarker.apply_watermark(output.images)
        return output if return_dict else (output.images, output.nsfw_content_detected)

"""The stages of the pipelines that start from an image, each written once.

image -> `preprocess_image` -> `vae_codec.encode_images` -> (strength) `strength_timesteps` -> `noise_to_timestep`
(`strength_schedule` and `noised_image_latents` put those together for image-to-image and depth-to-image);
mask -> `preprocess_mask` -> `mask_conditioning`; `mask_crop_region` / `paste_crop_back` for padding_mask_crop;
`UNetExtras`: the mask / depth tensors the UNet reads beside the latents, shown to `callback_on_step_end`.
Image-to-image, inpainting, depth-to-image, SDXL img2img / inpainting and the upscalers call these.

The numbers match diffusers' `VaeImageProcessor` and its pipelines: same resizing (Lanczos for PIL images,
nearest for arrays and tensors, sizes floored to a multiple of 8), same binarized masks, and random numbers
drawn in the same order and shapes, so the same seed gives the same image.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from stablepipe.image import ImageInput, match_channels, pil_to_8bit, pil_to_pt, pil_to_rgb, to_unit_float
from stablepipe.pipelines import stages, vae_codec
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.random import Generator, randn_tensor

logger = logging.getLogger("stablepipe")

ImageBatch = list[PIL.Image.Image] | torch.Tensor  # PIL images, or (B, C, H, W) floats / latents
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), PIL's crop box

LANCZOS = PIL.Image.Resampling.LANCZOS


# ---- checks ---------------------------------------------------------------------------------------------


def check_strength(strength: float, num_inference_steps: int | None = None) -> None:
    """`strength` in [0, 1], and enough of it to leave at least one denoising step."""
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}; e.g. 0.75 keeps the image's layout")
    if num_inference_steps is not None and isinstance(num_inference_steps, int):
        check_steps_left(min(int(num_inference_steps * strength), num_inference_steps), strength, num_inference_steps)


def check_schedule(
    num_inference_steps: int, strength: float, *, timesteps: list[int] | None = None, sigmas: list[float] | None = None
) -> None:
    """The step count (or a custom schedule) and a strength that leaves at least one of its steps."""
    stages.check_steps(num_inference_steps, timesteps, sigmas)
    check_strength(strength, None if timesteps or sigmas else num_inference_steps)


def check_steps_left(steps_left: int, strength: float, num_inference_steps: int) -> None:
    if steps_left < 1:
        raise ValueError(
            f"strength={strength} of num_inference_steps={num_inference_steps} leaves no denoising step "
            f"(int(steps * strength) = {steps_left}); raise strength or num_inference_steps"
        )


# UNet input channels -> (what that UNet is, the pipelines it belongs in, an SD 1.x / 2.x checkpoint with it).
UNET_KINDS = {
    4: ("a text-to-image UNet (4 input channels)", "StableDiffusionPipeline or StableDiffusionImg2ImgPipeline",
        "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    5: ("a depth UNet (5 input channels: 4 latent + 1 depth)", "StableDiffusionDepth2ImgPipeline",
        "stabilityai/stable-diffusion-2-depth"),
    7: ("the x4 upscaler's UNet (7 input channels: 4 latent + 3 image)", "StableDiffusionUpscalePipeline",
        "stabilityai/stable-diffusion-x4-upscaler"),
    9: ("an inpainting UNet (9 input channels: 4 latent + 1 mask + 4 masked-image latent)",
        "StableDiffusionInpaintPipeline", "stable-diffusion-v1-5/stable-diffusion-inpainting"),
}


def check_unet_channels(
    unet, allowed: Sequence[int], pipeline: str, *, checkpoints: dict[int, str] | None = None
) -> None:
    """A clear error when the UNet was made for another task (e.g. a text-to-image UNet in depth2img).

    `checkpoints` names an example checkpoint per channel count for the error message (SDXL pipelines pass
    their own); the default names SD 1.x / 2.x ones."""
    channels = unet.config.in_channels
    if channels in allowed:
        return
    wanted = " or ".join(UNET_KINDS[n][0] if n in UNET_KINDS else f"{n} input channels" for n in allowed)
    kind, belongs, _ = UNET_KINDS.get(channels, (f"a UNet with {channels} input channels", None, None))
    if pipeline.startswith("StableDiffusionXL") and channels in (4, 9):  # SDXL has its own of these two kinds
        belongs = belongs.replace("StableDiffusion", "StableDiffusionXL")
    examples = {n: entry[2] for n, entry in UNET_KINDS.items()} | (checkpoints or {})
    example = next((examples[n] for n in allowed if n in examples), None)
    raise ValueError(
        f"{pipeline} needs {wanted}, but this UNet is {kind}"
        + (f"; that one belongs in {belongs}" if belongs else "")
        + (f". Load a checkpoint for this task, e.g. {pipeline}.from_pretrained({example!r})" if example else "")
    )


# ---- loading inputs -----------------------------------------------------------------------------------------


def load_images(image: ImageInput, *, kind: str = "image", latent_channels: int | None = 4) -> ImageBatch:
    """Any image input as PIL images or a (B, C, H, W) float tensor.

    `kind="image"`: PIL images become RGB; arrays and tensors get 3 channels and [0, 1] floats (uint8 and
    uint16 scaled), except tensors with `latent_channels` channels, which are latents and kept as they are.
    `kind="mask"`: PIL images keep their mode (made gray after resizing, as diffusers does); arrays and
    tensors become (B, 1, H, W).
    """
    if image is None:
        raise ValueError(f"no {kind} given; pass a PIL image, a numpy array, a tensor or a list of them")
    items = list(image) if isinstance(image, list | tuple) else [image]
    if not items:
        raise ValueError(f"the {kind} list is empty")
    if all(isinstance(item, PIL.Image.Image) for item in items):
        return [pil_to_rgb(item) if kind == "image" else pil_to_8bit(item) for item in items]
    if all(isinstance(item, np.ndarray | torch.Tensor) for item in items):
        tensors = [array_to_batch(item, kind=kind, latent_channels=latent_channels) for item in items]
        if len({tuple(t.shape[1:]) for t in tensors}) > 1:
            raise ValueError(f"the {kind}s in the list have different shapes {[tuple(t.shape) for t in tensors]}")
        return torch.cat(tensors)
    names = sorted({type(item).__name__ for item in items})
    raise TypeError(f"{kind} must be PIL images, numpy arrays or tensors (not mixed), got {', '.join(names)}")


def array_to_batch(array: np.ndarray | torch.Tensor, *, kind: str, latent_channels: int | None) -> torch.Tensor:
    """One numpy array ((H, W), (H, W, C), (B, H, W, C)) or tensor ((H, W), (C, H, W), (B, C, H, W))
    -> (B, C, H, W) floats; masks: 3-D tensors and 3-D arrays whose last axis is not 1, 3 or 4 are (B, H, W)."""
    if array.ndim not in (2, 3, 4):
        raise ValueError(f"a {kind} array must have 2, 3 or 4 dimensions, got shape {tuple(array.shape)}")
    if isinstance(array, np.ndarray):
        batch_of_masks = kind == "mask" and array.ndim == 3 and array.shape[-1] not in (1, 3, 4)
        tensor = torch.from_numpy(np.array(array, order="C"))  # a copy: arrays from PIL are read-only
        tensor = tensor[..., None] if array.ndim == 2 or batch_of_masks else tensor  # (.., H, W, C)
        tensor = tensor[None] if tensor.ndim == 3 else tensor  # (B, H, W, C)
        tensor = tensor.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W), laid out as from PIL
    else:
        tensor = array[None, None] if array.ndim == 2 else array
        tensor = tensor.unsqueeze(1 if kind == "mask" else 0) if tensor.ndim == 3 else tensor  # (B, C, H, W)
        if kind == "image" and tensor.shape[1] == latent_channels:
            return tensor  # latents, used as they are
    if tensor.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"a {kind} needs 1, 3 or 4 color channels, got shape {tuple(array.shape)}")
    return match_channels(to_unit_float(tensor, name=kind), 1 if kind == "mask" else 3)


def pixel_size(batch: ImageBatch, *, latent_channels: int | None = 4, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(height, width) in pixels of the first image (latents count as their decoded size)."""
    if isinstance(batch, list):
        return batch[0].height, batch[0].width
    height, width = batch.shape[-2:]
    scale = vae_scale_factor if batch.shape[1] == latent_channels else 1
    return height * scale, width * scale


def batch_length(batch: ImageBatch) -> int:
    return len(batch) if isinstance(batch, list) else batch.shape[0]


def check_mask_matches_image(mask: ImageBatch, image: ImageBatch, *, latent_channels: int, scale: int) -> None:
    """The mask must cover the image pixel for pixel, one mask for all images or one per image."""
    mask_size, image_size = pixel_size(mask, latent_channels=None), pixel_size(image, latent_channels=latent_channels,
                                                                                  vae_scale_factor=scale)
    if mask_size != image_size:
        raise ValueError(
            f"mask_image is {mask_size[1]}x{mask_size[0]} but image is {image_size[1]}x{image_size[0]} "
            "(width x height); give a mask of the image's size, e.g. mask.resize(image.size)"
        )
    masks, images = batch_length(mask), batch_length(image)
    if masks != images and 1 not in (masks, images):
        raise ValueError(f"got {masks} masks for {images} images; give one mask for all images or one per image")


# ---- resizing --------------------------------------------------------------------------------------------


def target_size(height: int, width: int, *, multiple: int = 8) -> tuple[int, int]:
    """(height, width) floored to a multiple of `multiple` (the VAE's downsampling), as diffusers does."""
    floored = (height - height % multiple, width - width % multiple)
    if min(floored) <= 0:
        raise ValueError(f"the image is {width}x{height} pixels; it must be at least {multiple}x{multiple}")
    if floored != (height, width):
        logger.warning("image size %dx%d is not a multiple of %d; resized to %dx%d", width, height, multiple,
                       floored[1], floored[0])
    return floored


def fit_pil(image: PIL.Image.Image, width: int, height: int, *, cover: bool) -> PIL.Image.Image:
    """Resize keeping the aspect ratio, centered on a (width, height) RGB canvas. `cover=False` fits inside and
    fills the borders by stretching the edge rows / columns (diffusers' "fill"); `cover=True` fills the canvas
    and crops the overflow (diffusers' "crop")."""
    ratio, source = width / height, image.width / image.height
    wider = ratio < source  # the image is wider than the target
    use_width = ratio > source if cover else wider  # scale to the target's width (else to its height)
    src_w = width if use_width else image.width * height // image.height
    src_h = height if not use_width else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if not cover and ratio != source:
        fill_edges(canvas, resized, wider=wider)
    return canvas


def fill_edges(canvas: PIL.Image.Image, resized: PIL.Image.Image, *, wider: bool) -> None:
    """Fill the empty bands around a centered image with its first / last row (or column), stretched."""
    width, height = canvas.size
    if wider:
        band = height // 2 - resized.height // 2
        if band > 0:
            top, bottom = (0, 0, width, 0), (0, resized.height, width, resized.height)
            canvas.paste(resized.resize((width, band), box=top), box=(0, 0))
            canvas.paste(resized.resize((width, band), box=bottom), box=(0, band + resized.height))
    else:
        band = width // 2 - resized.width // 2
        if band > 0:
            left, right = (0, 0, 0, height), (resized.width, 0, resized.width, height)
            canvas.paste(resized.resize((band, height), box=left), box=(0, 0))
            canvas.paste(resized.resize((band, height), box=right), box=(band + resized.width, 0))


def resize_batch(
    batch: ImageBatch,
    *,
    height: int | None,
    width: int | None,
    multiple: int = 8,
    crop: Box | None = None,
    mode: str = "RGB",
) -> torch.Tensor:
    """Images -> (B, C, H, W) of the given size (default: the first image's), floored to `multiple`.

    PIL images: cropped to `crop` first and then fitted keeping their aspect ratio (the padding_mask_crop
    path), else resized with Lanczos; then converted to `mode`. Tensors: nearest-neighbour resize.
    """
    if isinstance(batch, torch.Tensor):
        height, width = target_size(height or batch.shape[2], width or batch.shape[3], multiple=multiple)
        return F.interpolate(batch, size=(height, width))  # (B, C, H, W)
    if crop is not None:
        batch = [image.crop(crop) for image in batch]
    height, width = target_size(height or batch[0].height, width or batch[0].width, multiple=multiple)
    if crop is not None:
        batch = [fit_pil(image, width, height, cover=False) for image in batch]
    else:
        batch = [image.resize((width, height), resample=LANCZOS) for image in batch]
    return pil_to_pt([image if image.mode == mode else image.convert(mode) for image in batch])  # (B, C, H, W)


def preprocess_image(
    image: ImageInput,
    *,
    height: int | None = None,
    width: int | None = None,
    multiple: int = 8,
    latent_channels: int | None = 4,
    crop: Box | None = None,
) -> torch.Tensor:
    """Any image input -> (B, 3, H, W) in [-1, 1] for the VAE; latents (B, latent_channels, h, w) pass through.

    Arrays and tensors with negative values are taken to be in [-1, 1] already (as diffusers does)."""
    batch = load_images(image, kind="image", latent_channels=latent_channels)
    if isinstance(batch, torch.Tensor) and batch.shape[1] == latent_channels:
        return batch
    pixels = resize_batch(batch, height=height, width=width, multiple=multiple, crop=crop)  # (B, 3, H, W)
    return pixels if pixels.min() < 0 else 2.0 * pixels - 1.0


def preprocess_mask(
    mask: ImageInput, *, height: int | None = None, width: int | None = None, multiple: int = 8, crop: Box | None = None
) -> torch.Tensor:
    """Any mask input -> (B, 1, H, W) of 0 (keep) and 1 (repaint): gray, resized, binarized at 0.5."""
    batch = load_images(mask, kind="mask")
    values = resize_batch(batch, height=height, width=width, multiple=multiple, crop=crop, mode="L")
    return (values >= 0.5).to(values.dtype)  # (B, 1, H, W)


# ---- padding_mask_crop: work on the masked region only, paste the result back ------------------------------


def mask_crop_region(mask: PIL.Image.Image, width: int, height: int, *, pad: int = 0) -> Box:
    """The box around the mask's non-black pixels, grown by `pad`, then widened to the aspect ratio
    width / height and kept inside the image. An all-black mask gives the whole image."""
    marked = np.asarray(mask.convert("L")) != 0  # (H, W)
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    if rows.size == 0:
        return 0, 0, mask.width, mask.height
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, mask.width), min(int(rows[-1]) + 1 + pad, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = grow_span(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = grow_span(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def grow_span(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
    """Grow [start, end) by `grow` pixels split around it, shifted back inside [0, limit)."""
    start, end = start - grow // 2, end + grow - grow // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def paste_crop_back(
    images: Sequence[PIL.Image.Image], original: PIL.Image.Image, mask: PIL.Image.Image, crop: Box | None
) -> list[PIL.Image.Image]:
    """Put each generated image (of the crop, or of the whole image) back into `original`: the unmasked
    pixels come from `original`, blended by the gray mask, as diffusers' `apply_overlay`."""
    keep = PIL.Image.new("RGBa", original.size)  # the original where the mask is black, premultiplied alpha
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(mask.convert("L")))
    keep = keep.convert("RGBA")
    results = []
    for image in images:
        if crop is not None:
            x1, y1, x2, y2 = crop
            canvas = PIL.Image.new("RGBA", original.size)
            canvas.paste(fit_pil(image, x2 - x1, y2 - y1, cover=True), (x1, y1))
            image = canvas.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(keep)
        results.append(image.convert("RGB"))
    return results


# ---- latents -----------------------------------------------------------------------------------------------


def repeat_to_batch(tensor: torch.Tensor, batch_size: int, *, what: str) -> torch.Tensor:
    """(n, ...) -> (batch_size, ...) by tiling the whole batch (diffusers' order: a, b, a, b)."""
    n = tensor.shape[0]
    if batch_size % n:
        raise ValueError(
            f"got {n} {what} for a batch of {batch_size} (prompts x num_images_per_prompt); give one, or one per prompt"
        )
    return tensor.repeat(batch_size // n, *([1] * (tensor.ndim - 1))) if n < batch_size else tensor


def image_latents_for_batch(
    vae, image: torch.Tensor, batch_size: int, *, generator: Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Image-to-image's clean latents (batch_size, C, h, w): `image` encoded (or given as latents) and tiled.
    A list of generators encodes every copy with its own generator (diffusers' img2img order)."""
    image = image.to(device=device, dtype=dtype)
    if image.shape[1] == vae.config.latent_channels:
        return repeat_to_batch(image, batch_size, what="images")
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one or one per image")
        image = repeat_to_batch(image, batch_size, what="images")
    return repeat_to_batch(vae_codec.encode_images(vae, image, generator=generator), batch_size, what="images")


# ---- strength -----------------------------------------------------------------------------------------------


def strength_timesteps(scheduler, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """Keep the last `strength` part of the schedule (SDEdit, Meng et al. 2021): the image is noised to the
    first kept timestep and denoised from there. Returns the kept timesteps and their step count."""
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - kept, 0)  # steps skipped
    check_steps_left(num_inference_steps - start, strength, num_inference_steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :], num_inference_steps - start


def strength_schedule(
    scheduler, num_inference_steps: int, strength: float, device: torch.device, *,
    timesteps: list[int] | None = None, sigmas: list[float] | None = None,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The scheduler's timesteps (or the custom `timesteps` / `sigmas`), the first (1 - strength) of them
    skipped; returns them and their step count."""
    timesteps, num_inference_steps = stages.retrieve_timesteps(
        scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
    )
    return strength_timesteps(scheduler, num_inference_steps, strength)


def noised_image_latents(
    vae, scheduler, image: torch.Tensor, batch_size: int, timestep: torch.Tensor, *, generator: Generator,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Image-to-image's starting latents (batch_size, C, h, w): `image` encoded (or given as latents), tiled to
    the batch and noised to `timestep`."""
    latents = image_latents_for_batch(vae, image, batch_size, generator=generator, dtype=dtype, device=device)
    return noise_to_timestep(scheduler, latents, timestep, generator=generator)[0]


def noise_to_timestep(
    scheduler, latents: torch.Tensor, timestep: torch.Tensor, *, generator: Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents (B, C, h, w) -> (noisy latents at `timestep`, the noise): q(x_t | x_0), Ho et al. 2020, Eq. 4."""
    noise = randn_tensor(tuple(latents.shape), generator=generator, device=latents.device, dtype=latents.dtype)
    return scheduler.add_noise(latents, noise, timestep.repeat(latents.shape[0])), noise


# ---- inpainting -------------------------------------------------------------------------------------------


def inpaint_start_latents(
    scheduler,
    shape: tuple[int, ...],
    *,
    image_latents: torch.Tensor | None,
    timestep: torch.Tensor,
    full_strength: bool,
    generator: Generator,
    latents: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inpainting's starting latents and the noise they hold: pure noise at strength 1 (or the given
    `latents`), else the image latents noised to `timestep`."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} images; pass one or one per image")
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {tuple(shape)}")
        return latents.to(device) * scheduler.init_noise_sigma, latents.to(device)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # (B, C, h, w)
    if full_strength:
        return noise * scheduler.init_noise_sigma, noise
    return scheduler.add_noise(image_latents, noise, timestep.repeat(shape[0])), noise


def double_for_guidance(tensor: torch.Tensor, guided: bool) -> torch.Tensor:
    """(B, ...) -> (2B, ...) for classifier-free guidance's (uncond, cond) halves."""
    return torch.cat([tensor] * 2) if guided else tensor


def mask_conditioning(
    mask: torch.Tensor,
    masked_image_latents: torch.Tensor | None,
    batch_size: int,
    *,
    latent_size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask (n, 1, H, W) at latent size (batch_size, 1, h, w) (nearest) and the masked image's latents,
    both tiled to the batch."""
    mask = F.interpolate(mask, size=latent_size).to(device=device, dtype=dtype)  # (n, 1, h, w)
    mask = repeat_to_batch(mask, batch_size, what="masks")
    if masked_image_latents is not None:
        masked_image_latents = masked_image_latents.to(device=device, dtype=dtype)
        masked_image_latents = repeat_to_batch(masked_image_latents, batch_size, what="masked images")
    return mask, masked_image_latents


def blend_known_region(
    scheduler, latents: torch.Tensor, mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
    next_timestep: torch.Tensor | None,
) -> torch.Tensor:
    """For a 4-channel UNet: keep the image (noised to the next timestep, clean after the last) where the
    mask is 0, the denoised latents where it is 1 (Blended Latent Diffusion, Avrahami et al. 2023)."""
    known = image_latents if next_timestep is None else scheduler.add_noise(image_latents, noise, next_timestep)
    return (1 - mask) * known + mask * latents


# ---- what the UNet reads beside the latents -----------------------------------------------------------------


@dataclasses.dataclass
class UNetExtras:
    """Named conditioning tensors (each (2B or B, c, h, w)) that `callback_on_step_end` may read and replace
    (diffusers' "mask", "masked_image_latents", "depth_mask" tensor inputs); `concatenated` ones are joined, in
    order, into the UNet input (`Conditioning.extra_channels`)."""

    tensors: dict[str, torch.Tensor]
    concatenated: bool = True

    def channels(self) -> torch.Tensor | None:
        return torch.cat(list(self.tensors.values()), dim=1) if self.concatenated else None

    def shown_to(self, callback: Callable | None, cond: Conditioning) -> Callable | None:
        """`callback_on_step_end` as `run_denoise` takes it, seeing these tensors among the ones it asked for;
        the tensors it returns replace them, in `cond.extra_channels` too (latents and prompt embeddings are
        the loop's own: `denoising.step_end_callback`)."""
        if callback is None:
            return None

        def with_extras(pipe, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            tensors.update({name: value for name, value in self.tensors.items() if name in tensors})
            outputs = callback(pipe, i, t, tensors) or {}
            replaced = {name: outputs[name] for name in self.tensors if name in outputs}
            if replaced:
                self.tensors.update(replaced)
                cond.extra_channels = self.channels()
            return outputs

        return with_extras

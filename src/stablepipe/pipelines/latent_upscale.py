"""The x2 latent upscaler (stabilityai/sd-x2-latent-upscaler): Stable Diffusion latents in, latents at 2x out.

image or latents -> `image_latents` (VAE encode) -> `latent_conditioning` (2x nearest latents beside the noisy
ones; noise level and pooled text as `timestep_cond`) -> `denoise` with `KarrasDenoiser` (Euler on sigma, the
UNet preconditioned as in k-diffusion, whole or with `TiledUNet`) -> decode at 2x.

It takes a text-to-image pipeline's `output_type="latent"` output directly, so the two chain without a decode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from stablepipe.image import ImageInput, denormalize, postprocess
from stablepipe.pipelines import arguments, image_stages, stages, text, upscale, vae_codec
from stablepipe.pipelines.base import DiffusionPipeline, StableDiffusionPipelineOutput
from stablepipe.pipelines.denoising import Conditioning
from stablepipe.random import Generator
from stablepipe.schedulers.denoiser import karras_scalings

NOISE_LEVEL_FEATURES = 64  # [cos, sin] features of the conditioning image's noise level, 64 each


# ---- the low-resolution latents ----------------------------------------------------------------------------


def image_latents(vae, image: torch.Tensor, *, generator: Generator) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> sampled, scaled latents (B, C, H/8, W/8); latents pass through."""
    if image.shape[1] == vae.config.latent_channels:
        return image
    return vae_codec.encode_images(vae, image, generator=generator)


def latent_conditioning(
    latents: torch.Tensor, pooled: torch.Tensor, *, batch_size: int, copies: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-res latents at 2x (nearest), as extra UNet channels (copies * B, C, 2h, 2w), and the UNet's
    `timestep_cond` (copies * B, 128 + D): [cos, sin] features of the conditioning's noise level (0: no noise
    augmentation, so ones and zeros) followed by the pooled text embedding."""
    latents = image_stages.repeat_to_batch(latents, batch_size, what="images")  # (B, C, h, w)
    latents = torch.cat([latents] * copies)  # (copies * B, C, h, w)
    level = torch.zeros(latents.shape[0], dtype=torch.float32, device=latents.device)  # sigma of the conditioning
    inv_noise = (level**2 + 1) ** -0.5  # c_in of that sigma (Karras et al. 2022, Table 1)
    extra = F.interpolate(latents, scale_factor=2, mode="nearest") * inv_noise[:, None, None, None]
    ones = torch.ones(pooled.shape[0], NOISE_LEVEL_FEATURES, dtype=pooled.dtype, device=pooled.device)
    timestep_cond = torch.cat([ones, torch.zeros_like(ones), pooled], dim=1)  # (copies * B, 128 + D)
    return extra.to(pooled.dtype), timestep_cond


# ---- the denoiser ----------------------------------------------------------------------------------------------


def sigmas_by_timestep(scheduler) -> dict[float, torch.Tensor]:
    """t -> sigma for each of the scheduler's timesteps (after `set_timesteps`): the noise level the loop's step at
    t stands for, paired by position (timesteps[i] with sigmas[i]). A timestep repeated with another sigma would
    make that ambiguous, so it is refused."""
    table: dict[float, torch.Tensor] = {}
    for t, sigma in zip(scheduler.timesteps.tolist(), scheduler.sigmas, strict=False):  # sigmas end with one more
        if not torch.equal(table.setdefault(t, sigma), sigma):
            raise ValueError(
                f"{type(scheduler).__name__} gives timestep {t} two different sigmas ({table[t].item()} and "
                f"{sigma.item()}), so the latent upscaler cannot tell which noise level a step at {t} is; use "
                "EulerDiscreteScheduler (the model card's), or this scheduler without use_karras_sigmas"
            )
    return table


class KarrasDenoiser:
    """The latent upscaler's UNet as a denoiser D(x, sigma), called like a UNet by the shared denoising loop.

    The loop passes the scheduler-scaled input c_in x (the `latent_channels` first channels) with the
    conditioning channels and the step's timestep t, whose sigma `sigmas` gives (`sigmas_by_timestep`); the UNet
    is called at c_noise and its extra output channel dropped, and the result is the clean-latent estimate, so
    the scheduler must use prediction_type "sample".
    """

    def __init__(self, unet: Callable, sigmas: Mapping[float, torch.Tensor], *, latent_channels: int):
        self.unet, self.sigmas, self.latent_channels = unet, sigmas, latent_channels

    def __call__(self, sample: torch.Tensor, timestep, *, encoder_hidden_states, return_dict: bool = False, **kw):
        sigma = self.sigmas[float(timestep)].to(sample.device)
        c_skip, c_out, c_in, c_noise = karras_scalings(sigma)
        scaled = sample[:, : self.latent_channels]  # c_in x, (B, C, H, W)
        out = self.unet(sample, c_noise, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kw)[0]
        return (scaled * (c_skip / c_in) + c_out * out[:, :-1],)  # (B, C, H, W)


def check_scheduler(scheduler) -> None:
    """The denoiser works on sigma and returns x0: it needs a k-diffusion (sigma) scheduler predicting "sample"."""
    if not hasattr(scheduler, "sigmas") or scheduler.config.get("prediction_type") != "sample":
        kind = scheduler.config.get("prediction_type")
        raise ValueError(
            f"the latent upscaler needs a sigma scheduler with prediction_type='sample' (its model card uses "
            f"EulerDiscreteScheduler); got {type(scheduler).__name__} with prediction_type={kind!r}"
        )


# ---- the pipeline ----------------------------------------------------------------------------------------


class StableDiffusionLatentUpscalePipeline(DiffusionPipeline):
    """Text-guided 2x upscaling in latent space, for Stable Diffusion's latents (or images, encoded first)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        channels = vae.config.latent_channels
        if unet.config.in_channels != 2 * channels:
            raise ValueError(
                f"StableDiffusionLatentUpscalePipeline needs a UNet with {2 * channels} input channels ({channels} "
                f"latent + {channels} low-res latent), but this one has {unet.config.in_channels}; load "
                "stabilityai/sd-x2-latent-upscaler"
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def guidance_distilled(self) -> bool:
        """False: the UNet's `timestep_cond` carries the noise level and pooled text, not a guidance scale, so
        guidance_scale > 1 is classifier-free guidance as usual."""
        return False

    def check_inputs(self, prompt, image, prompt_embeds, callback_steps, tile_size, tile_overlap):
        """Every argument check, before any model runs; returns the loaded input and the tiling spec."""
        check_scheduler(self.scheduler)
        stages.check_callback_steps(callback_steps)
        batch = image_stages.load_images(image, kind="image", latent_channels=self.vae.config.latent_channels)
        upscale.check_image_batch(image_stages.batch_length(batch), stages.prompt_batch_size(prompt, prompt_embeds))
        # the UNet sees the latents at 2x and its blur resampling needs >= 2 pixels at the lowest level
        levels, name = upscale.unet_minimum_size(self.unet), type(self).__name__
        upscale.check_low_res_size(batch, minimum=self.vae_scale_factor * levels, pipeline=name,
                                   latent_channels=self.vae.config.latent_channels,
                                   vae_scale_factor=self.vae_scale_factor)  # fmt: skip
        if isinstance(batch, torch.Tensor) and batch.shape[1] == self.vae.config.latent_channels:
            if any(side % (levels // 2) for side in batch.shape[-2:]):
                raise ValueError(
                    f"{name} got latents of size {tuple(batch.shape[-2:])}: at 2x its UNet halves them "
                    f"{levels.bit_length() - 1} times, so each side must be a multiple of {levels // 2} "
                    f"(images: of {self.input_multiple} pixels)"
                )
        return batch, upscale.tile_spec(tile_size, tile_overlap, scale=2 / self.vae_scale_factor, multiple=2 * levels)

    @property
    def input_multiple(self) -> int:
        """Input images are floored to a multiple of this many pixels, so that the 2x latents halve evenly at every
        UNet level (diffusers floors to the VAE's 8 and then fails inside the UNet on other sizes)."""
        return self.vae_scale_factor * upscale.unet_minimum_size(self.unet) // 2

    @torch.no_grad()
    @arguments.checked_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt: str | list[str] | None = None,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ):
        """Upscale `image` (PIL / array / tensor images, or (B, 4, h, w) latents) 2x. `tile_size` (pixels of the
        decoded input, a multiple of 32) runs the UNet and the VAE in tiles overlapping by `tile_overlap`."""
        # 1. Check inputs
        device = self.begin_call({}, guidance_scale=guidance_scale, output_type=output_type)
        batch, tiles = self.check_inputs(prompt, image, prompt_embeds, callback_steps, tile_size, tile_overlap)
        stages.check_steps(num_inference_steps, None, None)
        batch_size = stages.prompt_batch_size(prompt, prompt_embeds)
        # 2. Timesteps, and the noise level (sigma) each stands for
        timesteps, num_inference_steps = stages.retrieve_timesteps(self.scheduler, num_inference_steps, device)
        sigmas = sigmas_by_timestep(self.scheduler)
        # 3. Encode the prompt (guidance_scale 0: unconditional, as in diffusers)
        if guidance_scale == 0 and prompt_embeds is None:
            prompt = [""] * batch_size
        embeds, negative, pooled, negative_pooled = text.encode_prompt_batch(
            text.bind_text_encoders(self, [text.LATENT_UPSCALER_TEXT_ENCODER]), prompt, negative_prompt,
            given=text.PromptEmbeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                    negative_pooled_prompt_embeds),
            device=device, guided=self.do_classifier_free_guidance, weighted=self.prompt_weighting,
        ).as_tuple()
        cond = Conditioning(embeds, negative)
        # 4. The low-res latents (B_img, 4, h, w): given, or encoded from the image
        channels = self.vae.config.latent_channels
        low_res = upscale.preprocess_low_res(batch, multiple=self.input_multiple, latent_channels=channels)
        with upscale.vae_tiling(self.vae, tiles):
            low_res = image_latents(self.vae, low_res.to(device, embeds.dtype), generator=generator)
        # 5. Conditioning: 2x latents as extra channels, noise level + pooled text as timestep_cond
        pooled = pooled if negative_pooled is None else torch.cat([negative_pooled, pooled])
        cond.extra_channels, timestep_cond = latent_conditioning(low_res, pooled, batch_size=batch_size,
                                                                 copies=cond.copies)  # fmt: skip
        cond.unet_kwargs["timestep_cond"] = timestep_cond
        # 6. Initial noise (B, 4, 2h, 2w)
        latents = upscale.noise_beside_image(self, cond, generator=generator, latents=latents)
        # 7. Denoise: Euler on sigma with the preconditioned UNet, whole or tile by tile
        unet = upscale.TiledUNet(self.unet, tiles) if tiles else self.unet
        latents = self.run_denoise(
            latents, timesteps, cond, num_inference_steps=num_inference_steps, callback=callback,
            callback_steps=callback_steps,
            model=KarrasDenoiser(unet, sigmas, latent_channels=channels),
        )
        # 8. Decode at 2x (tiled too), convert
        with upscale.vae_tiling(self.vae, tiles):
            images = self.decode(latents, output_type)
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images,)

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> the requested output type (no safety checker: diffusers' latent upscaler has none)."""
        if output_type == "latent":
            return latents
        return postprocess(denormalize(vae_codec.decode_latents(self.vae, latents)), output_type,
                           do_denormalize=[False] * latents.shape[0])  # fmt: skip

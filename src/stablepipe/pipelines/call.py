"""What every pipeline's `__call__` does around its own stages, written once.

`begin_call` is the prologue (unknown arguments, output type, callback inputs, the guider, the per-call state
that diffusers' read-only properties show to callbacks); `initial_noise` draws the starting latents;
`run_denoise` hands the loop (`denoising.denoise`) what it needs: the UNet (or the model standing in for it),
the scheduler, the guider, the step kwargs and the hooks. Each `__call__` is then its numbered stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablepipe.pipelines import denoising, stages
from stablepipe.pipelines.step_cache import step_cached_model
from stablepipe.random import Generator

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class DenoisingCallMixin:
    """The per-call state of a pipeline and the glue between its `__call__` and the denoising loop."""

    _callback_tensor_inputs: tuple[str, ...] = ("latents",)
    _output_types: tuple[str, ...] = OUTPUT_TYPES
    _guider: denoising.Guider = denoising.NoGuidance()
    _num_timesteps: int = 0
    _interrupt: bool = False

    # ---- diffusers' read-only properties, for callbacks --------------------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guider.scale

    @property
    def _guidance_scale(self) -> float:
        return self._guider.scale

    @_guidance_scale.setter
    def _guidance_scale(self, scale: float) -> None:
        """What diffusers' callbacks set mid-call (`pipe._guidance_scale = 0.0`: dynamic CFG); the loop reads the
        guider again after each callback."""
        self._guider = self._guider.with_scale(scale)

    @property
    def guidance_rescale(self) -> float:
        return getattr(self._guider, "rescale", 0.0)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guider.guided

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ---- the prologue -----------------------------------------------------------------------------------

    def guidance_distilled(self) -> bool:
        """True for UNets that take the guidance scale as an embedding (LCM) and so run unguided."""
        unet = getattr(self, "unet", None)
        return unet is not None and unet.config.get("time_cond_proj_dim") is not None

    def begin_call(
        self,
        unsupported: dict[str, Any],
        *,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        callback_inputs: Sequence[str] = ("latents",),
    ) -> torch.device:
        """Check what every `__call__` takes, choose the guider, reset the per-call state; return the device."""
        if unsupported:
            raise TypeError(f"{type(self).__name__} got unknown arguments {sorted(unsupported)}")
        stages.check_output_type(output_type, self._output_types)
        stages.check_callback_inputs(callback_inputs, self._callback_tensor_inputs)
        self._guider = denoising.choose_guider(
            guidance_scale, distilled=self.guidance_distilled(), rescale=guidance_rescale
        )
        self._interrupt, self._num_timesteps = False, 0
        return self.device

    # ---- the starting latents and the loop ----------------------------------------------------------------

    def initial_noise(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        dtype: torch.dtype,
        generator: Generator,
        latents: torch.Tensor | None = None,
        channels: int | None = None,
    ) -> torch.Tensor:
        """Noise (batch, channels, height / f, width / f) drawn as diffusers draws it (or `latents` checked),
        scaled by the scheduler's starting sigma; `channels` defaults to the VAE's latent channels."""
        scale = self.vae_scale_factor
        shape = (batch, channels or self.vae.config.latent_channels, height // scale, width // scale)
        return stages.prepare_latents(
            shape, dtype=dtype, device=self.device, generator=generator, latents=latents,
            init_noise_sigma=self.scheduler.init_noise_sigma,
        )

    def run_denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: denoising.Conditioning,
        *,
        num_inference_steps: int,
        generator: Generator = None,
        eta: float = 0.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback: Callable | None = None,
        callback_steps: int = 1,
        after_step: Sequence[denoising.StepHook] = (),
        model: Callable | None = None,
        guider: denoising.Guider | None = None,
    ) -> torch.Tensor:
        """Run the loop with this call's guider (or `guider`), `model` in place of the UNet (a tiled UNet, a
        denoiser wrapping it; else the UNet, step-cached where `enable_step_cache` asked), diffusers' two
        callback styles and the pipeline's own `after_step` hooks (run first)."""
        self._num_timesteps = len(timesteps)
        legacy = () if callback is None else (denoising.legacy_step_callback(
            callback, callback_steps, num_timesteps=len(timesteps), num_inference_steps=num_inference_steps,
            order=getattr(self.scheduler, "order", 1),
        ),)  # fmt: skip
        hooks = denoising.LoopHooks(
            after_step=(*after_step, *legacy),
            on_step_end=None if callback_on_step_end is None else denoising.step_end_callback(
                self, callback_on_step_end, callback_on_step_end_tensor_inputs
            ),
            interrupted=lambda: self._interrupt,
            guider=None if guider is not None else (lambda: self._guider),
        )
        return denoising.denoise(
            step_cached_model(self, model) or self.unet, self.scheduler, latents, timesteps, cond,
            guider=guider or self._guider, num_inference_steps=num_inference_steps,
            step_kwargs=stages.step_kwargs(self.scheduler, generator=generator, eta=eta), hooks=hooks,
            progress=lambda total: self.progress_bar(total=total),
        )

"""Step caching (DeepCache, Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free", sec. 3.2-3.3).

Between neighbouring denoising steps the UNet's deep features change little. Every `interval`-th step runs the
whole UNet and keeps the input of its last up block (the deep features, upsampled to full resolution); the steps
in between run only the shallow part: the time embedding, `conv_in`, the first down block's layers (not its
downsampler) and the last up block, which takes the kept features and this step's own shallow skips. That is
the paper's uniform 1:N strategy with the skip branch at the outermost level. Opt-in: the picture changes (see
benchmarks/RESULTS.md for the measured speed and PSNR).

`StepCachedUNet` holds the kept features for one denoising loop; `denoise` makes a fresh one per loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablepipe.models.unet import UNet2DConditionOutput

UNSUPPORTED_KWARGS = ("cross_attention_kwargs", "attention_mask", "encoder_attention_mask",
                      "down_block_additional_residuals", "mid_block_additional_residual")  # fmt: skip


def check_interval(interval: int) -> int:
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"step cache interval must be an int >= 1 (1: no caching, 2: every other step), got "
                         f"{interval!r}")  # fmt: skip
    return interval


class StepCachedUNet:
    """Called as the UNet (same arguments, `return_dict=False`); every `interval`-th call runs it whole."""

    def __init__(self, unet: nn.Module, interval: int):
        self.unet = unet
        self.interval = check_interval(interval)
        self.calls = 0
        self.deep: torch.Tensor | None = None  # the last up block's input at the last full step
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        self.supported = (hasattr(first, "resnets") and hasattr(last, "resnets") and last.upsamplers is None
                          and len(first.resnets) >= len(last.resnets) - 1)  # fmt: skip

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        full = self.calls % self.interval == 0 or self.deep is None or self.deep.shape[0] != sample.shape[0]
        self.calls += 1
        if full or not self.supported or any(kwargs.get(key) is not None for key in UNSUPPORTED_KWARGS):
            return self.full(sample, timestep, encoder_hidden_states, **kwargs)
        out = self.shallow(sample, timestep, encoder_hidden_states, **kwargs)
        return (out,) if kwargs.get("return_dict") is False else UNet2DConditionOutput(sample=out)

    def full(self, sample, timestep, encoder_hidden_states, **kwargs):
        """The whole UNet, keeping its last up block's input."""

        def keep(module, args):
            self.deep = args[0]

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(keep)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        finally:
            handle.remove()

    def shallow(self, sample, timestep, context, *, class_labels=None, timestep_cond=None, added_cond_kwargs=None,
                **_: Any) -> torch.Tensor:  # fmt: skip
        """The outermost level only, on the kept deep features: (B, out_channels, H, W)."""
        unet = self.unet
        emb = unet.embed(sample, timestep, class_labels, timestep_cond, added_cond_kwargs)  # (B, temb)
        context = unet.process_encoder_hidden_states(context, added_cond_kwargs)  # + IP-Adapter image tokens
        x = unet.conv_in(2 * sample - 1.0 if unet.config.center_input_sample else sample)  # (B, C0, H, W)
        skips = [x]
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        for i in range(len(last.resnets) - 1):  # the first down block's layers that feed the last up block
            x = first.layer(i, first.resnets[i](x, emb), context)
            skips.append(x)
        x = last(self.deep, skips, emb, context)  # (B, C0, H, W)
        if unet.conv_norm_out is not None:
            x = unet.conv_act(unet.conv_norm_out(x))
        return unet.conv_out(x)


def step_cached_model(pipe, model):
    """What the denoising loop calls: a fresh `StepCachedUNet` where `pipe.enable_step_cache` asked for one (and no
    other model replaces the UNet), else `model` as given."""
    interval = getattr(pipe, "_step_cache_interval", 1)
    if model is not None or interval <= 1 or not hasattr(getattr(pipe, "unet", None), "up_blocks"):
        return model
    return StepCachedUNet(pipe.unet, interval)

"""Convolutional building blocks: the time-conditioned residual block and 2x down/upsampling.

Parameter names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, ..., `conv_shortcut`), so its state dicts
load as they are. The residual block is the one of DDPM (Ho et al. 2020, appendix B), with the timestep
embedding added between the two convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def get_activation(name: str, *, key: str = "act_fn") -> nn.Module:
    """The activation called `name` in configs (`"silu"`, `"gelu"`, ...); `key` names the config field."""
    cls = ACTIVATIONS.get(name.lower())
    if cls is None:
        raise ValueError(f"{key}={name!r} is not a known activation; use one of {sorted(ACTIVATIONS)}")
    return cls()


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, with the projected timestep embedding added after the first conv.

    `temb_channels=None` gives the unconditioned block of the VAE. The skip path gets a 1x1 conv when the
    channel count changes. The output is divided by `output_scale_factor` (1 except in some mid blocks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "silu",
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


@dataclass(frozen=True)
class ResnetSpec:
    """The settings every residual block of one network shares; `build` makes one block of given widths."""

    temb_channels: int | None  # width of the timestep embedding; None in the VAE
    groups: int  # GroupNorm groups
    eps: float  # GroupNorm epsilon
    act_fn: str  # activation name, as in configs
    output_scale_factor: float = 1.0

    def build(self, in_channels: int, out_channels: int) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels,
            out_channels,
            temb_channels=self.temb_channels,
            groups=self.groups,
            eps=self.eps,
            non_linearity=self.act_fn,
            output_scale_factor=self.output_scale_factor,
        )


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. `padding=0` pads right and bottom only, as the LDM VAE does."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C_out, ceil(H/2), ceil(W/2))


class Upsample2D(nn.Module):
    """Double H and W (or reach `output_size`) by nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")  # (B, C, *output_size)
        return self.conv(x)

"""The K-diffusion UNet blocks of the x2 latent upscaler (Crowson's k-diffusion, as diffusers names them).

They differ from the latent-diffusion blocks in `unet.py`: every normalisation is an adaptive GroupNorm driven by
the time embedding (AdaGN, Dhariwal & Nichol 2021, sec. 3.1), attention has no feed-forward and takes layer-normed
text, resampling is a fixed 4-tap blur kernel instead of a strided conv, and each block hands only its last output
to the up path. The builders at the bottom (`DOWN_BLOCKS`, `UP_BLOCKS`) are registered in `unet.py`'s block
tables, so the one `UNet2DConditionModel` builds the latent upscaler from its config.
Module and parameter names are diffusers' state-dict names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stablepipe.models.attention import Attention
from stablepipe.models.resnet import get_activation

if TYPE_CHECKING:
    from stablepipe.models.unet import BlockArgs

GROUP_SIZE = 32  # channels per GroupNorm group in every K-block (diffusers' `resnet_group_size`)


class AdaGroupNorm(nn.Module):
    """GroupNorm without its own affine weights, modulated by the time embedding: x̂ (1 + s) + b, [s, b] = W emb.

    Adaptive group normalisation (Dhariwal & Nichol 2021, sec. 3.1, "AdaGN").
    """

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int, *, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


def blur_kernel(channels: int, gain: float, like: torch.Tensor) -> torch.Tensor:
    """The separable 4-tap kernel [1, 3, 3, 1] / 8 (times `gain` per axis), one per channel: (C, 1, 4, 4)."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=like.dtype, device=like.device) * (gain / 8)
    return torch.outer(taps, taps).expand(channels, 1, 4, 4)


class KDownsample2D(nn.Module):
    """Halve H and W: reflect-pad by 1, then the blur kernel at stride 2 on each channel alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
        return F.conv2d(x, blur_kernel(x.shape[1], 1.0, x), stride=2, groups=x.shape[1])  # (B, C, H/2, W/2)


class KUpsample2D(nn.Module):
    """Double H and W: reflect-pad by 1, then the transposed blur kernel (gain 2 per axis) at stride 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
        kernel = blur_kernel(x.shape[1], 2.0, x)
        return F.conv_transpose2d(x, kernel, stride=2, padding=3, groups=x.shape[1])  # (B, C, 2H, 2W)


@dataclass(frozen=True)
class KResnetSpec:
    """What every residual block of a K-UNet shares; `build` makes one of given widths."""

    temb_channels: int
    eps: float
    act_fn: str

    def build(self, in_channels: int, out_channels: int, *, groups_out: int, conv_out: int | None = None):
        groups = {"groups": in_channels // GROUP_SIZE, "groups_out": groups_out}
        return AdaResnetBlock2D(in_channels, out_channels, conv_out_channels=conv_out, spec=self, **groups)


class AdaResnetBlock2D(nn.Module):
    """Residual block with AdaGN: (AdaGN, act, conv) twice, plus a bias-free 1x1 shortcut when widths differ.

    diffusers' `ResnetBlockCondNorm2D` with `time_embedding_norm="ada_group"`. `conv_out_channels` lets the
    second conv change the width (the last block of a K up block narrows to the next block's width).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        spec: KResnetSpec,
        groups: int,
        groups_out: int,
        conv_out_channels: int | None = None,
    ):
        super().__init__()
        final = conv_out_channels or out_channels
        self.norm1 = AdaGroupNorm(spec.temb_channels, in_channels, groups, eps=spec.eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = AdaGroupNorm(spec.temb_channels, out_channels, groups_out, eps=spec.eps)
        self.conv2 = nn.Conv2d(out_channels, final, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(spec.act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, final, 1, bias=False) if in_channels != final else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x, temb)))  # (B, C_out, H, W)
        h = self.conv2(self.nonlinearity(self.norm2(h, temb)))  # (B, C_final, H, W)
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class NormedCrossAttention(Attention):
    """`Attention` whose context is layer-normed first (diffusers' `cross_attention_norm="layer_norm"`)."""

    def __init__(self, query_dim: int, *, cross_attention_dim: int, **kw):
        super().__init__(query_dim, cross_attention_dim=cross_attention_dim, **kw)
        self.norm_cross = nn.LayerNorm(cross_attention_dim)  # applied to the context by the processor


@dataclass(frozen=True)
class KAttentionSpec:
    """What every attention block of one K block shares; `build` makes one of a given width."""

    head_dim: int  # channels per head; heads = width // head_dim
    cross_attention_dim: int
    temb_channels: int
    self_attention: bool  # an AdaGN + self-attention before the cross-attention

    def build(self, dim: int) -> KAttentionBlock:
        return KAttentionBlock(dim, spec=self)


class KAttentionBlock(nn.Module):
    """[AdaGN, self-attention, residual], then AdaGN, cross-attention on the text, residual; no feed-forward."""

    def __init__(self, dim: int, *, spec: KAttentionSpec):
        super().__init__()
        groups = max(1, dim // GROUP_SIZE)
        heads = {"heads": dim // spec.head_dim, "dim_head": spec.head_dim, "bias": True}
        if spec.self_attention:
            self.norm1 = AdaGroupNorm(spec.temb_channels, dim, groups)
            self.attn1 = Attention(dim, **heads)
        else:
            self.norm1 = self.attn1 = None
        self.norm2 = AdaGroupNorm(spec.temb_channels, dim, groups)
        self.attn2 = NormedCrossAttention(dim, cross_attention_dim=spec.cross_attention_dim, **heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.attn1 is not None:
            x = x + attend_pixels(self.attn1, self.norm1(x, temb), None)  # (B, C, H, W)
        return x + attend_pixels(self.attn2, self.norm2(x, temb), context)


def attend_pixels(attention: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Run `attention` over the pixels of a feature map: (B, C, H, W) -> (B, C, H, W)."""
    b, c, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
    return attention(tokens, context).permute(0, 2, 1).reshape(b, c, h, w)


# ---- blocks. Same calls as unet.py's: down (x, temb, context) -> (x, skips); up (x, skips, temb, context, size).


class KDownBlock2D(nn.Module):
    """AdaGN residual blocks, then an optional blur downsample; every residual output is a skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        resnet: KResnetSpec,
        add_downsample: bool,
        layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        groups_out = out_channels // GROUP_SIZE
        self.resnets = nn.ModuleList()
        layers = nn.ModuleList()
        for width in widths:  # each residual block, then its attention: diffusers' order of random draws
            self.resnets.append(resnet.build(width, out_channels, groups_out=groups_out))
            if layer is not None:
                layers.append(layer(len(layers)))
        if layer is not None:
            self.attentions = layers
        self.downsamplers = nn.ModuleList([KDownsample2D()]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None, attention=None):
        skips: list[torch.Tensor | None] = []
        for i, resnet in enumerate(self.resnets):
            x = self.layer(i, resnet(x, temb), context, temb)  # (B, C_out, H, W)
            skips.append(self.skip(x))
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
        return x, skips

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, temb: torch.Tensor) -> torch.Tensor:
        return x

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        return x


class KCrossAttnDownBlock2D(KDownBlock2D):
    """`KDownBlock2D` with an attention block after each residual block. As in diffusers, the last down block
    (no downsample) adds self-attention and passes no skips (None) up, the others pass every output."""

    def __init__(self, in_channels: int, out_channels: int, *, attention: KAttentionSpec, **kw):
        super().__init__(in_channels, out_channels, **kw, layer=lambda i: attention.build(out_channels))

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, temb: torch.Tensor) -> torch.Tensor:
        return self.attentions[i](x, context, temb)

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        return x if self.downsamplers is not None else None


class KUpBlock2D(nn.Module):
    """Concatenate the last skip, AdaGN residual blocks (the last narrowing to `in_channels`), optional upsample.

    `num_layers` counts as in the UNet config (layers_per_block + 1); the block has one residual block fewer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        resnet: KResnetSpec,
        add_upsample: bool,
        layer: Callable[[int, int], nn.Module] | None = None,
    ):
        super().__init__()
        n, groups_out = num_layers - 1, out_channels // GROUP_SIZE
        first = self.first_width(in_channels, out_channels, resnet)
        blocks, layers = [], []
        for i in range(n):  # each residual block, then its attention (layer(i, n)): diffusers' order of draws
            out, conv_out = self.widths(i, n, in_channels, out_channels)
            width = first if i == 0 else out_channels
            blocks.append(resnet.build(width, out, groups_out=groups_out, conv_out=conv_out))
            if layer is not None:
                layers.append(layer(i, n))
        self.resnets = nn.ModuleList(blocks)
        if layer is not None:
            self.attentions = nn.ModuleList(layers)
        self.upsamplers = nn.ModuleList([KUpsample2D()]) if add_upsample else None

    def first_width(self, in_channels: int, out_channels: int, resnet: KResnetSpec) -> int:
        return 2 * out_channels  # the input and its skip, concatenated

    def widths(self, i: int, n: int, in_channels: int, out_channels: int) -> tuple[int, int | None]:
        """(out_channels, conv_out) of residual block i of n: the last one outputs `in_channels`."""
        return (in_channels if i == n - 1 else out_channels), None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor | None],
        temb: torch.Tensor,
        context: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        attention=None,  # the UNet's AttentionArgs; K blocks take no masks or processor arguments
    ) -> torch.Tensor:
        if skips[-1] is not None:
            x = torch.cat([x, skips[-1]], dim=1)  # (B, C + C_skip, H, W)
        for i, resnet in enumerate(self.resnets):
            x = self.layer(i, resnet(x, temb), context, temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2H, 2W)
        return x

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, temb: torch.Tensor) -> torch.Tensor:
        return x


class KCrossAttnUpBlock2D(KUpBlock2D):
    """`KUpBlock2D` with an attention block after each residual block.

    diffusers' rules, kept for state-dict compatibility: the block is "first" (self-attention, no skip to
    concatenate) when in_channels == out_channels == the time embedding width; where the widths differ, the last
    residual block narrows to `in_channels` in its second conv only.
    """

    def __init__(self, in_channels: int, out_channels: int, *, attention: KAttentionSpec, resnet: KResnetSpec, **kw):
        self.is_first = in_channels == out_channels == resnet.temb_channels
        attention = KAttentionSpec(attention.head_dim, attention.cross_attention_dim, attention.temb_channels,
                                   self_attention=self.is_first)  # fmt: skip
        super().__init__(in_channels, out_channels, resnet=resnet, **kw,
                         layer=lambda i, n: attention.build(in_channels if i == n - 1 else out_channels))

    def first_width(self, in_channels: int, out_channels: int, resnet: KResnetSpec) -> int:
        return out_channels if self.is_first else 2 * out_channels

    def widths(self, i: int, n: int, in_channels: int, out_channels: int) -> tuple[int, int | None]:
        narrows = in_channels != out_channels and i == n - 1
        return out_channels, (in_channels if narrows else None)

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, temb: torch.Tensor) -> torch.Tensor:
        return self.attentions[i](x, context, temb)


# ---- builders for unet.py's block tables ------------------------------------------------------------------


def k_resnet_spec(a: BlockArgs) -> KResnetSpec:
    return KResnetSpec(a.temb_channels, a.config.norm_eps, a.config.act_fn)


def k_attention_spec(a: BlockArgs, *, self_attention: bool = False) -> KAttentionSpec:
    return KAttentionSpec(a.attention_head_dim, a.cross_attention_dim, a.temb_channels, self_attention)


def _down(a: BlockArgs, cls: type[KDownBlock2D], **extra) -> KDownBlock2D:
    return cls(a.in_channels, a.out_channels, num_layers=a.num_layers, resnet=k_resnet_spec(a),
               add_downsample=a.add_sampler, **extra)  # fmt: skip


def _up(a: BlockArgs, cls: type[KUpBlock2D], **extra) -> KUpBlock2D:
    return cls(a.in_channels, a.out_channels, num_layers=a.num_layers, resnet=k_resnet_spec(a),
               add_upsample=a.add_sampler, **extra)  # fmt: skip


DOWN_BLOCKS = {
    "KDownBlock2D": lambda a: _down(a, KDownBlock2D),
    # the last down block (no downsample) self-attends, as diffusers' get_down_block sets it
    "KCrossAttnDownBlock2D": lambda a: _down(
        a, KCrossAttnDownBlock2D, attention=k_attention_spec(a, self_attention=not a.add_sampler)
    ),
}
UP_BLOCKS = {
    "KUpBlock2D": lambda a: _up(a, KUpBlock2D),
    "KCrossAttnUpBlock2D": lambda a: _up(a, KCrossAttnUpBlock2D, attention=k_attention_spec(a)),
}

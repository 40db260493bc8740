"""The conditional UNet of latent diffusion (Rombach et al. 2022): one class for SD 1.x, 2.x, XL, upscalers.

The network is a config: `down_block_types`, `mid_block_type` and `up_block_types` name blocks, and each name
is looked up in a table (`DOWN_BLOCKS`, `MID_BLOCKS`, `UP_BLOCKS`) of builders taking a `BlockArgs`. A new
block family (the latent upscaler's K-blocks, say) is added by registering builders, not by subclassing.
Names of modules and parameters are diffusers' state-dict names, so diffusers folders load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from stablepipe.configuration import FrozenConfig, register_to_config
from stablepipe.models import kblocks
from stablepipe.models.attention import (
    Attention,
    AttentionArgs,
    AttentionProcessorMixin,
    AttentionSlicingMixin,
    AttnProcessor2_0,
    FusedProjectionsMixin,
    IPAdapterAttnProcessor2_0,
    SpatialSelfAttention,
    Transformer2DModel,
)
from stablepipe.models.base import ModelMixin, checkpointed
from stablepipe.models.embeddings import (
    GaussianFourierProjection,
    MultiIPAdapterImageProjection,
    TimestepEmbedding,
    Timesteps,
    image_projection_from_state_dict,
    load_exactly,
)
from stablepipe.models.resnet import Downsample2D, ResnetSpec, Upsample2D, get_activation
from stablepipe.outputs import BaseOutput

# ----------------------------------------------------------------------------------------------------------
# Blocks. Uniform calls: down block (x, temb, context) -> (x, skips); mid block (x, temb, context) -> x;
# up block (x, skips, temb, context, upsample_size) -> x, consuming the last len(block.resnets) skips.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerSpec:
    """The settings of the transformers in one UNet block; `build` makes one of given width and depth."""

    num_heads: int
    cross_attention_dim: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast_attention: bool

    def build(self, channels: int, num_layers: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.num_heads,
            channels // self.num_heads,
            channels,
            num_layers=num_layers,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.groups,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
        )


def _per_layer(value: int | list[int], num_layers: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_layers


def interleaved(first: Callable[[int], nn.Module] | None, second: Callable[[int], nn.Module] | None,
                count: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """`count` modules from each builder, built alternately (first(0), second(0), first(1), ...) as diffusers
    builds a block's resnets and attentions, so that the same torch seed gives the same random weights."""
    firsts, seconds = nn.ModuleList(), nn.ModuleList()
    for i in range(count):
        if first is not None:
            firsts.append(first(i))
        if second is not None:
            seconds.append(second(i))
    return firsts, seconds


class DownBlock2D(nn.Module):
    """`num_layers` residual blocks, then an optional stride-2 conv; every output is kept as a skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        resnet: ResnetSpec,
        add_downsample: bool,
        downsample_padding: int = 1,
        layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets, layers = interleaved(lambda i: resnet.build(widths[i], out_channels), layer, num_layers)
        if layer is not None:
            self.attentions = layers
        down = [Downsample2D(out_channels, out_channels, padding=downsample_padding)] if add_downsample else None
        self.downsamplers = nn.ModuleList(down) if add_downsample else None  # built only when used: no extra draws
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None,
        attention: AttentionArgs | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.layer(i, checkpointed(self, resnet, x, temb), context, attention)  # (B, C_out, H, W)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, attention=None) -> torch.Tensor:
        """What follows the i-th residual block (nothing here; attention in the cross-attention variant)."""
        return x


class TransformerLayers:
    """Mixin for a down or up block: a transformer after each residual block, `transformer_layers` deep
    (one depth for all, or one per residual block), as wide as the block's output (its last channel count)."""

    def __init__(self, *channels: int, transformer: TransformerSpec, transformer_layers, **kw):
        depths = _per_layer(transformer_layers, kw["num_layers"])
        super().__init__(*channels, **kw, layer=lambda i: transformer.build(channels[-1], depths[i]))

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, attention=None) -> torch.Tensor:
        return self.attentions[i](x, context, attention)


class CrossAttnDownBlock2D(TransformerLayers, DownBlock2D):
    """`DownBlock2D` with a transformer after each residual block."""


class UpBlock2D(nn.Module):
    """Residual blocks on [x, skip] concatenated along channels, then an optional 2x upsample."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        resnet: ResnetSpec,
        add_upsample: bool,
        layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        inputs = [prev_output_channels] + [out_channels] * (num_layers - 1)  # from below
        skips = [out_channels] * (num_layers - 1) + [in_channels]  # from the down path
        self.resnets, layers = interleaved(lambda i: resnet.build(inputs[i] + skips[i], out_channels), layer,
                                           num_layers)
        if layer is not None:
            self.attentions = layers
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None
        self.gradient_checkpointing = False
        self.resolution_idx = 0  # the block's place in the up path (set by the UNet), for FreeU
        self.s1 = self.s2 = self.b1 = self.b2 = None  # FreeU's factors; None: off

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        attention: AttentionArgs | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x, skip = self.freeu(x, skips[-1 - i])
            x = torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
            x = self.layer(i, checkpointed(self, resnet, x, temb), context, attention)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)  # (B, C_out, 2H, 2W)
        return x

    def layer(self, i: int, x: torch.Tensor, context: torch.Tensor | None, attention=None) -> torch.Tensor:
        return x

    def freeu(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FreeU (Si et al. 2023) in the two lowest-resolution up blocks, as diffusers applies it: half the
        backbone channels scaled by b, the skip's lowest frequencies by s."""
        if self.b1 is None or self.resolution_idx > 1:
            return x, skip
        b, s = (self.b1, self.s1) if self.resolution_idx == 0 else (self.b2, self.s2)
        half = x.shape[1] // 2
        return torch.cat([x[:, :half] * b, x[:, half:]], dim=1), fourier_filter(skip, threshold=1, scale=s)


def fourier_filter(x: torch.Tensor, *, threshold: int, scale: float) -> torch.Tensor:
    """`x` (B, C, H, W) with the (2 threshold)² lowest spatial frequencies multiplied by `scale` (FreeU, Eq. 6)."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))  # centred spectrum
    h, w = x.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    mask[h // 2 - threshold : h // 2 + threshold, w // 2 - threshold : w // 2 + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1))
    return filtered.real.to(x.dtype)


class CrossAttnUpBlock2D(TransformerLayers, UpBlock2D):
    """`UpBlock2D` with a transformer after each residual block."""


class UNetMidBlock2D(nn.Module):
    """A residual block, then `num_layers` x (attention, residual block). Attention is optional.

    In the UNet (`mid_block_type="UNetMidBlock2D"`) it is a single residual block; in the VAE it has one
    pixel self-attention (`SpatialSelfAttention`).
    """

    def __init__(self, channels: int, *, resnet: ResnetSpec, num_layers: int = 1, add_attention: bool = True):
        super().__init__()
        heads_of = {"heads": 1, "norm_num_groups": resnet.groups, "eps": resnet.eps}
        first = resnet.build(channels, channels)
        attention = (lambda i: SpatialSelfAttention(channels, **heads_of)) if add_attention else None
        self.attentions, rest = interleaved(attention, lambda i: resnet.build(channels, channels), num_layers)
        self.resnets = nn.ModuleList([first, *rest])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, context=None, attention=None) -> torch.Tensor:
        x = checkpointed(self, self.resnets[0], x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            x = self.attentions[i](x) if len(self.attentions) else x
            x = checkpointed(self, resnet, x, temb)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """A residual block, then (transformer, residual block): the UNet's bottleneck."""

    def __init__(self, channels: int, *, resnet: ResnetSpec, transformer: TransformerSpec, transformer_layers):
        super().__init__()
        first = resnet.build(channels, channels)  # built in diffusers' order (same random weights for a seed)
        self.attentions = nn.ModuleList([transformer.build(channels, _per_layer(transformer_layers, 1)[0])])
        self.resnets = nn.ModuleList([first, resnet.build(channels, channels)])
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None,
        attention: AttentionArgs | None = None,
    ) -> torch.Tensor:
        x = checkpointed(self, self.resnets[0], x, temb)
        return checkpointed(self, self.resnets[1], self.attentions[0](x, context, attention), temb)  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------------------
# Block tables: config name -> builder(BlockArgs). Register new block types here.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockArgs:
    """One stage of the UNet as the config describes it: a row of the per-block config lists."""

    in_channels: int  # down: the previous block's width; up: the width of the matching down block's input
    out_channels: int
    prev_output_channels: int  # up blocks: the width coming from the block below; else = in_channels
    temb_channels: int
    num_layers: int  # residual blocks in this block
    add_sampler: bool  # down/upsample at its end (all but the last block)
    transformer_layers: int | list[int]  # transformer depth, one for all layers or one per layer
    num_heads: int  # attention heads (diffusers' `attention_head_dim` quirk already resolved)
    attention_head_dim: int  # the raw per-block `attention_head_dim` (what the K-blocks take)
    cross_attention_dim: int
    only_cross_attention: bool
    resolution_idx: int  # position of the block in its path
    config: FrozenConfig  # the UNet config, for model-wide settings (norms, activation, projections)


def _unsupported(key: str, value: Any, supported) -> ValueError:
    return ValueError(
        f"UNet2DConditionModel config: {key}={value!r} is not supported by stablepipe; supported: "
        f"{sorted(supported, key=repr)}. This checkpoint needs a network stablepipe does not build yet."
    )


def resnet_spec(a: BlockArgs, *, output_scale_factor: float = 1.0) -> ResnetSpec:
    """The residual-block settings of the standard blocks, refusing what they cannot build."""
    c = a.config
    if c.resnet_time_scale_shift != "default":
        raise _unsupported("resnet_time_scale_shift", c.resnet_time_scale_shift, ["default"])
    if c.norm_num_groups is None:
        raise _unsupported("norm_num_groups", None, ["an int"])
    return ResnetSpec(a.temb_channels, c.norm_num_groups, c.norm_eps, c.act_fn, output_scale_factor)


def transformer_spec(a: BlockArgs) -> TransformerSpec:
    c = a.config
    return TransformerSpec(
        a.num_heads,
        a.cross_attention_dim,
        c.norm_num_groups,
        c.use_linear_projection,
        a.only_cross_attention,
        c.upcast_attention,
    )


def _down(a: BlockArgs, cls: type[DownBlock2D], **extra) -> DownBlock2D:
    return cls(
        a.in_channels,
        a.out_channels,
        num_layers=a.num_layers,
        resnet=resnet_spec(a),
        add_downsample=a.add_sampler,
        downsample_padding=a.config.downsample_padding,
        **extra,
    )


def _up(a: BlockArgs, cls: type[UpBlock2D], **extra) -> UpBlock2D:
    channels = (a.in_channels, a.prev_output_channels, a.out_channels)
    return cls(*channels, num_layers=a.num_layers, resnet=resnet_spec(a), add_upsample=a.add_sampler, **extra)


def _with_attention(a: BlockArgs) -> dict[str, Any]:
    return {"transformer": transformer_spec(a), "transformer_layers": a.transformer_layers}


BlockBuilder = Callable[[BlockArgs], nn.Module]

DOWN_BLOCKS: dict[str, BlockBuilder] = {
    "DownBlock2D": lambda a: _down(a, DownBlock2D),
    "CrossAttnDownBlock2D": lambda a: _down(a, CrossAttnDownBlock2D, **_with_attention(a)),
    **kblocks.DOWN_BLOCKS,  # the latent upscaler's K-diffusion blocks
}
UP_BLOCKS: dict[str, BlockBuilder] = {
    "UpBlock2D": lambda a: _up(a, UpBlock2D),
    "CrossAttnUpBlock2D": lambda a: _up(a, CrossAttnUpBlock2D, **_with_attention(a)),
    **kblocks.UP_BLOCKS,
}
MID_BLOCKS: dict[str | None, BlockBuilder] = {
    "UNetMidBlock2DCrossAttn": lambda a: UNetMidBlock2DCrossAttn(
        a.in_channels,
        resnet=resnet_spec(a, output_scale_factor=a.config.mid_block_scale_factor),
        **_with_attention(a),
    ),
    "UNetMidBlock2D": lambda a: UNetMidBlock2D(
        a.in_channels,
        resnet=resnet_spec(a, output_scale_factor=a.config.mid_block_scale_factor),
        num_layers=0,
    ),
    None: lambda a: None,
}


def build_block(table: dict, key: str, index: int | None, args: BlockArgs) -> nn.Module | None:
    """Look up the block type named by config `key` (entry `index` of it) and build it."""
    c = args.config
    name = c[key] if index is None else c[key][index]
    if name not in table:
        label = key if index is None else f"{key}[{index}]"
        raise _unsupported(label, name, list(table))
    return table[name](args)


def unet_stages(c: FrozenConfig, temb_channels: int) -> tuple[list[BlockArgs], BlockArgs, list[BlockArgs]]:
    """The `BlockArgs` of every down block, the mid block and every up block, read off the config."""
    n, widths = len(c.down_block_types), list(c.block_out_channels)
    heads_key = "attention_head_dim" if c.num_attention_heads is None else "num_attention_heads"
    rows = {  # per-block settings, reversed on the way up
        "num_heads": per_block(c, heads_key),  # diffusers' quirk: `attention_head_dim` holds the number of heads
        "cross_attention_dim": per_block(c, "cross_attention_dim"),
        "only_cross_attention": per_block(c, "only_cross_attention"),
    }
    head_dims, layers = per_block(c, "attention_head_dim"), per_block(c, "layers_per_block")
    depths = per_block(c, "transformer_layers_per_block")
    up_depths = c.reverse_transformer_layers_per_block or depths[::-1]

    def stage(i: int, up: bool, **values) -> BlockArgs:
        j = n - 1 - i if up else i  # index into the down-ordered lists
        return BlockArgs(
            **values,
            **{k: v[j] for k, v in rows.items()},
            attention_head_dim=widths[j] if head_dims[i] is None else head_dims[i],  # [i] going up too, as diffusers
            temb_channels=temb_channels,
            add_sampler=i < n - 1,
            resolution_idx=i,
            config=c,
        )

    down = [
        stage(i, False, in_channels=widths[max(i - 1, 0)], out_channels=widths[i],
              prev_output_channels=widths[max(i - 1, 0)], num_layers=layers[i], transformer_layers=depths[i])
        for i in range(n)
    ]  # fmt: skip
    mid = replace(down[-1], in_channels=widths[-1], prev_output_channels=widths[-1], num_layers=1,
                  add_sampler=False, only_cross_attention=False, resolution_idx=0)  # fmt: skip
    rev = widths[::-1]
    up = [
        stage(i, True, in_channels=rev[min(i + 1, n - 1)], out_channels=rev[i], prev_output_channels=rev[max(i - 1, 0)],
              num_layers=layers[n - 1 - i] + 1, transformer_layers=up_depths[i])
        for i in range(n)
    ]  # fmt: skip
    return down, mid, up


# ----------------------------------------------------------------------------------------------------------
# Embedding tables: timestep features and class embeddings.
# ----------------------------------------------------------------------------------------------------------


def _positional(c: FrozenConfig) -> tuple[nn.Module, int, int]:
    embed_dim = c.time_embedding_dim or c.block_out_channels[0] * 4
    proj = Timesteps(c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
    return proj, c.block_out_channels[0], embed_dim


def _fourier(c: FrozenConfig) -> tuple[nn.Module, int, int]:
    embed_dim = c.time_embedding_dim or c.block_out_channels[0] * 2
    if embed_dim % 2:
        raise ValueError(f"time_embedding_dim must be even for fourier time embeddings, got {embed_dim}")
    proj = GaussianFourierProjection(embed_dim // 2, log=False, flip_sin_to_cos=c.flip_sin_to_cos)
    return proj, embed_dim, embed_dim


# time_embedding_type -> (features module, its width, width of the time embedding)
TIME_PROJECTIONS: dict[str, Callable[[FrozenConfig], tuple[nn.Module, int, int]]] = {
    "positional": _positional,
    "fourier": _fourier,
}


def _projection_dim(c: FrozenConfig) -> int:
    if c.projection_class_embeddings_input_dim is None:
        raise ValueError(f"class_embed_type={c.class_embed_type!r} needs projection_class_embeddings_input_dim")
    return c.projection_class_embeddings_input_dim


# class_embed_type -> builder(config, timestep feature width, time embedding width)
CLASS_EMBEDDINGS: dict[str | None, Callable[[FrozenConfig, int, int], nn.Module | None]] = {
    None: lambda c, t_in, t_dim: nn.Embedding(c.num_class_embeds, t_dim) if c.num_class_embeds else None,
    "timestep": lambda c, t_in, t_dim: TimestepEmbedding(t_in, t_dim, act_fn=c.act_fn),
    "identity": lambda c, t_in, t_dim: nn.Identity(),
    "projection": lambda c, t_in, t_dim: TimestepEmbedding(_projection_dim(c), t_dim),
    "simple_projection": lambda c, t_in, t_dim: nn.Linear(_projection_dim(c), t_dim),
}

# Config values that select networks stablepipe does not build; each must keep its default.
REQUIRED_DEFAULTS = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "attention_type": "default",
}
ADDITION_EMBED_TYPES = (None, "text_time")


def per_block(c: FrozenConfig, key: str, value: Any = None) -> list:
    """Config `key` (or `value`) as one entry per down block: a single value is repeated."""
    value = c[key] if value is None else value
    n = len(c.down_block_types)
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{key}={list(value)} has {len(value)} entries but there are {n} down blocks; give one each")
    return list(value)


def check_config(c: FrozenConfig) -> None:
    """Refuse, with the key, the value and what is supported, configs whose network we would build wrongly."""
    for key, default in REQUIRED_DEFAULTS.items():
        if c[key] != default:
            raise _unsupported(key, c[key], [default])
    choices = {
        "time_embedding_type": TIME_PROJECTIONS,
        "class_embed_type": CLASS_EMBEDDINGS,
        "addition_embed_type": ADDITION_EMBED_TYPES,
    }
    for key, supported in choices.items():
        if c[key] not in supported:
            raise _unsupported(key, c[key], list(supported))
    n = len(c.down_block_types)
    for key in ("up_block_types", "block_out_channels"):
        if len(c[key]) != n:
            raise ValueError(f"{key} has {len(c[key])} entries but down_block_types has {n}; they must match")
    if c.addition_embed_type == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if c[key] is None:
                raise ValueError(f"addition_embed_type='text_time' (SDXL) needs {key} in the config; it is None")
    nested = any(isinstance(v, (list, tuple)) for v in per_block(c, "transformer_layers_per_block"))
    if nested and c.reverse_transformer_layers_per_block is None:
        raise ValueError("per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block too")


# ----------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class UNet2DConditionOutput(BaseOutput):
    sample: torch.Tensor  # (B, out_channels, H, W): the predicted noise (or v, or x0)


class UNet2DConditionModel(AttentionProcessorMixin, AttentionSlicingMixin, FusedProjectionsMixin, ModelMixin):
    """The noise predictor eps(x_t, t, text) of latent diffusion, configured as diffusers' class of that name."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple = 1,
        reverse_transformer_layers_per_block: tuple | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        # Kept for diffusers compatibility but without effect here: `sample_size` (read by pipelines), `dropout`
        # (training only) and the settings of block types stablepipe does not build (resnet_skip_time_act,
        # resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention,
        # addition_embed_type_num_heads); diffusers ignores them for the blocks below as well.
        super().__init__()
        c = self.config
        check_config(c)
        width = block_out_channels[0]
        self.conv_in = nn.Conv2d(in_channels, width, conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        temb_channels = self._build_embeddings(c)
        self.encoder_hid_proj: nn.Module | None = None  # IP-Adapters' image projections, once loaded
        self._build_blocks(c, temb_channels * (2 if class_embeddings_concat else 1))
        if norm_num_groups is not None:
            self.conv_norm_out = nn.GroupNorm(norm_num_groups, width, eps=norm_eps)
            self.conv_act = get_activation(act_fn)
        else:
            self.conv_norm_out = self.conv_act = None
        self.conv_out = nn.Conv2d(width, out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2)

    def _build_embeddings(self, c: FrozenConfig) -> int:
        """Timestep, class and SDXL micro-conditioning embeddings; returns the time embedding width."""
        self.time_proj, t_in, t_dim = TIME_PROJECTIONS[c.time_embedding_type](c)
        self.time_embedding = TimestepEmbedding(
            t_in, t_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act, cond_proj_dim=c.time_cond_proj_dim
        )
        self.class_embedding = CLASS_EMBEDDINGS[c.class_embed_type](c, t_in, t_dim)
        if c.addition_embed_type == "text_time":
            flip = {"flip_sin_to_cos": c.flip_sin_to_cos, "freq_shift": c.freq_shift}
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, **flip)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, t_dim)
        act = c.time_embedding_act_fn
        self.time_embed_act = get_activation(act, key="time_embedding_act_fn") if act else None
        return t_dim

    def _build_blocks(self, c: FrozenConfig, temb_channels: int) -> None:
        """Down, mid and up blocks, each built by the table entry its config name picks."""
        down, mid, up = unet_stages(c, temb_channels)
        self.down_blocks = nn.ModuleList(build_block(DOWN_BLOCKS, "down_block_types", i, a) for i, a in enumerate(down))
        # registered before the mid block (built after it), as diffusers: `attn_processors` lists down, up, mid
        # blocks in this order, which numbers the layers of IP-Adapter files
        self.up_blocks = nn.ModuleList()
        self.mid_block = build_block(MID_BLOCKS, "mid_block_type", None, mid)
        self.up_blocks.extend(build_block(UP_BLOCKS, "up_block_types", i, a) for i, a in enumerate(up))
        for i, block in enumerate(self.up_blocks):
            block.resolution_idx = i
        self.num_upsamplers = len(up) - 1

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): b1, b2 scale the backbone features
        of the first two up blocks, s1, s2 the low frequencies of their skips (SD 1.5: 0.9, 0.2, 1.5, 1.6)."""
        for block in self.up_blocks:
            block.s1, block.s2, block.b1, block.b2 = s1, s2, b1, b2

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.s1 = block.s2 = block.b1 = block.b2 = None

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict from noisy latents `sample` (B, C, H, W) at `timestep`, attending to the text embeddings.

        `encoder_attention_mask` (B, M): 1 for text tokens to attend to, 0 for those to ignore (`attention_mask`
        likewise, on the pixels); `cross_attention_kwargs` go to the attention processors, except "scale", the
        LoRA scale, which the pipelines apply."""
        attention = _attention_args(sample, attention_mask, encoder_attention_mask, cross_attention_kwargs)
        encoder_hidden_states = self.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        emb = self.embed(sample, timestep, class_labels, timestep_cond, added_cond_kwargs)  # (B, temb)
        x = self.conv_in(2 * sample - 1.0 if self.config.center_input_sample else sample)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states, attention=attention)
            skips += block_skips
        if self.mid_block is not None:
            x = self.mid_block(x, emb, encoder_hidden_states, attention=attention)
        exact = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])  # odd sizes: upsample to skip size
        x = self.run_up_blocks(x, skips, emb, encoder_hidden_states, exact_sizes=exact, attention=attention)
        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        out = self.conv_out(x)  # (B, out_channels, H, W)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def process_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None):
        """The context the attention layers read: the text embeddings, or with IP-Adapters loaded (text, [image
        tokens (B, n_images, T, D) per adapter]) from `added_cond_kwargs["image_embeds"]`, as diffusers passes it."""
        if self.encoder_hid_proj is None or self.config.encoder_hid_dim_type != "ip_image_proj":
            return encoder_hidden_states
        if not added_cond_kwargs or added_cond_kwargs.get("image_embeds") is None:
            raise ValueError(
                "this UNet has IP-Adapters loaded: pass added_cond_kwargs={'image_embeds': [one tensor per adapter]} "
                "(pipelines: ip_adapter_image or ip_adapter_image_embeds), or unload them (pipe.unload_ip_adapter())"
            )
        return encoder_hidden_states, self.encoder_hid_proj(added_cond_kwargs["image_embeds"])

    def _load_ip_adapter_weights(self, state_dicts: dict | list[dict], low_cpu_mem_usage: bool = False) -> None:
        """Load IP-Adapters ({"image_proj": ..., "ip_adapter": ...} each, the original files' key names): their
        image projections become `encoder_hid_proj`, and every cross-attention gets an `IPAdapterAttnProcessor2_0`
        with their image key/value projections. Replaces adapters loaded before. (`low_cpu_mem_usage`: accepted,
        as diffusers; the weights are small.)"""
        state_dicts = state_dicts if isinstance(state_dicts, list) else [state_dicts]
        for i, state in enumerate(state_dicts):
            if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
                found = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"IP-Adapter state dict {i} needs 'image_proj' and 'ip_adapter' entries, got {found}")
        projections = [image_projection_from_state_dict(s["image_proj"], index=i) for i, s in enumerate(state_dicts)]
        self.encoder_hid_proj = None  # a Plus resampler's attention layers get no IP processors
        tokens = [count for _, count in projections]
        self.set_attn_processor(self._ip_attention_processors([s["ip_adapter"] for s in state_dicts], tokens))
        self.encoder_hid_proj = MultiIPAdapterImageProjection([m.to(self.device, self.dtype) for m, _ in projections])
        self.register_to_config(encoder_hid_dim_type="ip_image_proj")

    def _ip_attention_processors(self, ip_weights: list[dict[str, torch.Tensor]], num_tokens: list[int]) -> dict:
        """A processor for every attention layer: self-attentions keep theirs; each cross-attention gets an
        `IPAdapterAttnProcessor2_0` with every adapter's image key / value weights, numbered 1, 3, 5, ... in
        `attn_processors` order in the files (the even numbers are the self-attentions)."""
        layers = {f"{name}.processor": m for name, m in self.named_modules() if isinstance(m, Attention)}
        processors, key_id = {}, 1
        for name, current in self.attn_processors.items():
            if name.endswith("attn1.processor"):
                processors[name] = current
                continue
            with torch.device("meta"):  # no random init: the weights come next
                processor = IPAdapterAttnProcessor2_0(layers[name].to_k.out_features, layers[name].to_k.in_features,
                                                      num_tokens=num_tokens, scale=1.0)  # fmt: skip
            weights = {}
            for i, state in enumerate(ip_weights):
                for kind in ("k", "v"):
                    if f"{key_id}.to_{kind}_ip.weight" not in state:
                        raise ValueError(f"IP-Adapter {i} has no '{key_id}.to_{kind}_ip.weight' for {name}: it has "
                                         f"fewer cross-attention layers than this UNet (made for another model?)")
                    weights[f"to_{kind}_ip.{i}.weight"] = state[f"{key_id}.to_{kind}_ip.weight"]
            load_exactly(processor, weights, f"IP-Adapter weights of {name} (made for another model?)")
            processors[name] = processor.to(self.device, self.dtype)
            key_id += 2
        return processors

    def _unload_ip_adapter_weights(self) -> None:
        """Back to the UNet before `_load_ip_adapter_weights`: no image projection, plain cross-attention."""
        self.encoder_hid_proj = None
        self.register_to_config(encoder_hid_dim_type=None)
        self.set_attn_processor({name: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p
                                 for name, p in self.attn_processors.items()})  # fmt: skip

    def run_up_blocks(
        self, x, skips: list[torch.Tensor], emb, context, *, exact_sizes: bool, attention: AttentionArgs | None = None
    ) -> torch.Tensor:
        """The up path, each block taking its skips off the end of `skips`.

        With `exact_sizes` each upsampler targets the size of the next skip instead of doubling.
        """
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if exact_sizes and i < len(self.up_blocks) - 1 else None
            x = block(x, block_skips, emb, context, size, attention=attention)
        return x

    def embed(self, sample, timestep, class_labels=None, timestep_cond=None, added_cond_kwargs=None) -> torch.Tensor:
        """The conditioning vector of each sample: time (+ class) (+ SDXL text/size) embeddings. (B, temb)"""
        t_features = self.time_proj(_timesteps(timestep, sample)).to(sample.dtype)  # float32 -> model dtype
        emb = self.time_embedding(t_features, timestep_cond)  # (B, temb)
        if self.class_embedding is not None:
            class_emb = self.embed_class(sample, class_labels)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        if self.config.addition_embed_type == "text_time":
            emb = emb + self.embed_text_time(emb, added_cond_kwargs)
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    def embed_class(self, sample: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        if class_labels is None:
            raise ValueError(
                "this UNet is class-conditioned (num_class_embeds / class_embed_type in its config): pass class_labels"
            )
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(sample.dtype)
        return self.class_embedding(class_labels).to(sample.dtype)

    def embed_text_time(self, emb: torch.Tensor, added_cond_kwargs: dict | None) -> torch.Tensor:
        """SDXL micro-conditioning: pooled text embeds and sinusoidal features of the 6 size/crop ids."""
        added = added_cond_kwargs or {}
        missing = [k for k in ("text_embeds", "time_ids") if k not in added]
        if missing:
            raise ValueError(f"addition_embed_type='text_time' (SDXL) needs added_cond_kwargs with {missing}")
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]  # (B, D_text), (B, 6)
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)  # (B, 6*D_t)
        return self.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))


def _timesteps(timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
    """`timestep` as a 1-d tensor of one entry per sample, typed as diffusers types it."""
    if not torch.is_tensor(timestep):
        no_64bit = sample.device.type in ("mps", "npu")
        if isinstance(timestep, float):
            dtype = torch.float32 if no_64bit else torch.float64
        else:
            dtype = torch.int32 if no_64bit else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(sample.shape[0])  # (B,)


def _mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A keep (1) / discard (0) mask (B, M) as an additive bias (B, 1, M), as diffusers makes it; a float mask
    of 3 dimensions is taken as a bias already."""
    if mask is None or mask.ndim == 3:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0)[:, None]  # (B, 1, M)


def _attention_args(sample, attention_mask, encoder_attention_mask, cross_attention_kwargs) -> AttentionArgs | None:
    kwargs = {k: v for k, v in (cross_attention_kwargs or {}).items() if k != "scale"}  # scale: LoRA's
    if attention_mask is None and encoder_attention_mask is None and not kwargs:
        return None
    return AttentionArgs(_mask_bias(attention_mask, sample.dtype), _mask_bias(encoder_attention_mask, sample.dtype),
                         kwargs)


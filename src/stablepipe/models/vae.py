"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G).

Images (B, 3, H, W) in [-1, 1] map to a diagonal Gaussian over latents (B, 4, H/8, W/8) and back. Module
names are diffusers' state-dict names (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stablepipe.configuration import register_to_config
from stablepipe.models.attention import AttentionProcessorMixin, FusedProjectionsMixin
from stablepipe.models.base import ModelMixin, checkpointed
from stablepipe.models.resnet import Downsample2D, ResnetSpec, Upsample2D, get_activation
from stablepipe.models.unet import UNetMidBlock2D
from stablepipe.outputs import BaseOutput
from stablepipe.random import Generator, randn_tensor


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element, from encoder moments (B, 2C, h, w) split along channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters  # (B, 2C, h, w)
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """mean + std * eps, with eps drawn as diffusers draws it (same seed, same latents)."""
        noise = randn_tensor(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor  # (B, out_channels, H, W)
    commit_loss: torch.Tensor | None = None  # diffusers' field for quantising VAEs; always None here


class DownEncoderBlock2D(nn.Module):
    """Unconditioned residual blocks, then an optional downsample (padded right/bottom, as in the LDM VAE)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, resnet: ResnetSpec, add_downsample: bool
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = nn.ModuleList(resnet.build(w, out_channels) for w in widths)
        down = [Downsample2D(out_channels, out_channels, padding=0)] if add_downsample else None  # no unused draws
        self.downsamplers = nn.ModuleList(down) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    """Unconditioned residual blocks, then an optional nearest 2x upsample and conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, resnet: ResnetSpec, add_upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = nn.ModuleList(resnet.build(w, out_channels) for w in widths)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


def _check_block_types(key: str, types: list[str], supported: str) -> None:
    for i, name in enumerate(types):
        if name != supported:
            raise ValueError(
                f"AutoencoderKL config: {key}[{i}]={name!r} is not supported by stablepipe; supported: "
                f"[{supported!r}]. This checkpoint needs a network stablepipe does not build yet."
            )


class Encoder(nn.Module):
    """Image (B, in, H, W) -> Gaussian moments (B, 2 * latent, H / 2^(n-1), W / 2^(n-1))."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        *,
        block_out_channels: list[int],
        layers_per_block: int,
        resnet: ResnetSpec,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                widths[max(i - 1, 0)],
                w,
                num_layers=layers_per_block,
                resnet=resnet,
                add_downsample=i < len(widths) - 1,
            )
            for i, w in enumerate(widths)
        )
        self.mid_block = UNetMidBlock2D(widths[-1], resnet=resnet, add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(resnet.groups, widths[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            x = checkpointed(self, block, x)
        x = checkpointed(self, self.mid_block, x)  # (B, C_last, h, w)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, 2 * latent, h, w)


class Decoder(nn.Module):
    """Latents (B, latent, h, w) -> image (B, out, h * 2^(n-1), w * 2^(n-1))."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        *,
        block_out_channels: list[int],
        layers_per_block: int,
        resnet: ResnetSpec,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        widths = list(block_out_channels)[::-1]
        self.conv_in = nn.Conv2d(latent_channels, widths[0], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(widths[0], resnet=resnet, add_attention=mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)],
                w,
                num_layers=layers_per_block + 1,
                resnet=resnet,
                add_upsample=i < len(widths) - 1,
            )
            for i, w in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(resnet.groups, widths[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = checkpointed(self, self.mid_block, self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            x = checkpointed(self, block, x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, out, H, W)


class AutoencoderKL(AttentionProcessorMixin, FusedProjectionsMixin, ModelMixin):
    """The Stable Diffusion VAE, configured as diffusers' `AutoencoderKL`.

    `scaling_factor` (and `shift_factor`, `latents_mean`/`latents_std` where set) are for the pipelines:
    diffusion latents are `(z - shift) * scaling_factor`; `encode`/`decode` work on unscaled `z`.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        n = len(block_out_channels)
        _check_block_types("down_block_types", list(down_block_types), "DownEncoderBlock2D")
        _check_block_types("up_block_types", list(up_block_types), "UpDecoderBlock2D")
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types need one entry per block_out_channels ({n})")
        get_activation(act_fn)  # fail early on an unknown activation name
        resnet = ResnetSpec(temb_channels=None, groups=norm_num_groups, eps=1e-6, act_fn=act_fn)
        shape = {"block_out_channels": block_out_channels, "layers_per_block": layers_per_block, "resnet": resnet}
        attention = {"mid_block_add_attention": mid_block_add_attention}
        self.encoder = Encoder(in_channels, latent_channels, **shape, **attention)
        self.decoder = Decoder(latent_channels, out_channels, **shape, **attention)
        moments = 2 * latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.use_slicing = False
        # tiling (off until enable_tiling): diffusers' attribute names, so code that sets them works unchanged
        self.use_tiling = False
        self.tile_sample_min_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_latent_min_size = int(self.tile_sample_min_size / 2 ** (n - 1))
        self.tile_overlap_factor = 0.25

    # -- memory options ------------------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one image of the batch at a time (same results, less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(
        self, *, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None
    ) -> None:
        """Encode and decode large images in overlapping tiles, blended linearly at the seams: peak memory is that
        of one tile. Results differ from untiled ones near the seams. Tiles are `tile_sample_min_size` pixels
        (default: the config's `sample_size`) overlapping by `tile_overlap_factor` (default 0.25), the tiles and
        blending of diffusers' `AutoencoderKL`, so a tiled decode matches diffusers' tiled decode."""
        if tile_sample_min_size is not None:
            scale = 2 ** (len(self.config.block_out_channels) - 1)
            if tile_sample_min_size < scale or tile_sample_min_size % scale:
                raise ValueError(
                    f"tile_sample_min_size must be a positive multiple of {scale}, got {tile_sample_min_size}"
                )
            self.tile_sample_min_size, self.tile_latent_min_size = tile_sample_min_size, tile_sample_min_size // scale
        if tile_overlap_factor is not None:
            if not 0 <= tile_overlap_factor < 1:
                raise ValueError(f"tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}")
            self.tile_overlap_factor = tile_overlap_factor
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _in_slices(self, fn, x: torch.Tensor) -> torch.Tensor:
        """Apply `fn` to the whole batch, or image by image when slicing."""
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(part) for part in x.split(1)])
        return fn(x)

    def _in_tiles(self, fn, x: torch.Tensor, *, tile: int, out_tile: int) -> torch.Tensor:
        """Apply `fn` to the whole of `x`, or, when tiling and `x` is larger than a tile, tile by tile."""
        if self.use_tiling and max(x.shape[-2:]) > tile:
            return tiled_map(fn, x, tile=tile, out_tile=out_tile, overlap_factor=self.tile_overlap_factor)
        return fn(x)

    # -- encode / decode -----------------------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._in_tiles(self._encode_tile, x, tile=self.tile_sample_min_size, out_tile=self.tile_latent_min_size)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2 * latent, h, w)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._in_tiles(self._decode_tile, z, tile=self.tile_latent_min_size, out_tile=self.tile_sample_min_size)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)  # (B, out, H, W)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, C, H, W) in [-1, 1] -> `.latent_dist`, a Gaussian over unscaled latents."""
        posterior = DiagonalGaussianDistribution(self._in_slices(self._encode, x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Generator = None):
        """Unscaled latents (B, latent, h, w) -> `.sample`, images in about [-1, 1]. `generator` is unused."""
        images = self._in_slices(self._decode, z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: Generator = None,
    ):
        """Reconstruct: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


# ---- tiling ----------------------------------------------------------------------------------------------------


def blend_edge(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` rows (dim=2) or columns (dim=3) of `tile` from the last ones of `previous`,
    the neighbour above or to the left: weight k / extent on the tile's k-th line (linear blend)."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    ramp = (torch.arange(extent, dtype=torch.float64) / extent).reshape(shape)  # (1, 1, e, 1) or (1, 1, 1, e)
    ours, theirs = ramp.to(tile), (1 - ramp).to(tile)
    head = previous.narrow(dim, previous.shape[dim] - extent, extent) * theirs + tile.narrow(dim, 0, extent) * ours
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def tiled_map(fn, x: torch.Tensor, *, tile: int, out_tile: int, overlap_factor: float) -> torch.Tensor:
    """`fn` (a map from `tile` to `out_tile` pixels, e.g. the VAE decoder) applied tile by tile: (B, C, H, W) ->
    (B, C', H * out_tile / tile, W * out_tile / tile).

    Tiles start every `tile * (1 - overlap_factor)` pixels; each output tile is blended into its already blended
    neighbours above and to the left (`blend_edge` over `out_tile * overlap_factor` lines), then cut to the part
    not overlapped by the next one. Only one row of output tiles is held at a time.
    """
    stride, extent = int(tile * (1 - overlap_factor)), int(out_tile * overlap_factor)
    keep = out_tile - extent
    rows, above = [], None
    for i in range(0, x.shape[2], stride):
        row: list[torch.Tensor] = []
        for j in range(0, x.shape[3], stride):
            out = fn(x[:, :, i : i + tile, j : j + tile])  # (B, C', <= out_tile, <= out_tile)
            if above is not None:
                out = blend_edge(above[len(row)], out, extent, dim=2)
            if row:
                out = blend_edge(row[-1], out, extent, dim=3)
            row.append(out)
        rows.append(torch.cat([out[:, :, :keep, :keep] for out in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)

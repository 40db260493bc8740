"""Timestep embeddings: the sinusoidal (or random Fourier) features of a noise level, and the MLP on top."""

from __future__ import annotations

import math

import torch
from torch import nn

from stablepipe.models.resnet import get_activation


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of 1-d `timesteps`, in float32: (N,) -> (N, dim).

    Transformer positional encoding (Vaswani et al. 2017, sec. 3.5) as used by DDPM: frequencies
    max_period^(-i / (dim/2 - freq_shift)) for i < dim/2; halves [sin, cos], or [cos, sin] if flip_sin_to_cos.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-d (one per batch element), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = scale * (timesteps[:, None].float() * freqs[None, :])  # (N, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))  # (N, dim)
    return emb


class Timesteps(nn.Module):
    """`timestep_embedding` as a (weightless) module, configured once."""

    def __init__(self, num_channels: int, *, flip_sin_to_cos: bool, freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            scale=self.scale,
        )


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a noise level, [sin, cos](2 pi t w): (N,) -> (N, 2 * embedding_size).

    From score-based SDEs (Song et al. 2021, appendix C.1); `w` is a fixed random vector stored as `weight`.
    """

    def __init__(
        self,
        embedding_size: int = 256,
        *,
        scale: float = 1.0,
        log: bool = True,
        flip_sin_to_cos: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.log:
            t = torch.log(t)
        angles = t[:, None] * self.weight[None, :] * 2 * math.pi  # (N, embedding_size)
        parts = (
            [torch.cos(angles), torch.sin(angles)] if self.flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
        )
        return torch.cat(parts, dim=-1)


class TimestepEmbedding(nn.Module):
    """The MLP on the timestep features: [+ cond_proj(condition)] -> linear -> act -> linear [-> post_act]."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = get_activation(post_act_fn, key="timestep_post_act") if post_act_fn else None

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond was given but this model has no time_cond_proj_dim in its config")
            x = x + self.cond_proj(condition)  # (B, in_channels)
        x = self.linear_2(self.act(self.linear_1(x)))  # (B, time_embed_dim)
        return self.post_act(x) if self.post_act is not None else x

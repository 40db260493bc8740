"""Attention layers: multi-head attention, the transformer block of the UNet, and its 2-d wrapper.

Multi-head scaled dot-product attention is eq. (1) and sec. 3.2.2 of Vaswani et al. 2017; the transformer
block (self-attention, cross-attention on the text, GEGLU feed-forward, each pre-normed and residual) is the
`SpatialTransformer` of latent diffusion (Rombach et al. 2022, appendix). Attention runs through
`torch.nn.functional.scaled_dot_product_attention`. Module names are diffusers' state-dict names.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over `heads` heads: (B, N, heads*d), (B, M, heads*d) x2 -> (B, N, heads*d).

    With `upcast`, half-precision inputs are computed in float32: SD 2.1 overflows where scores are computed in
    float16 (torch's fused kernels accumulate in float32 already, so on them this costs time, not accuracy).
    """
    batch, dtype = q.shape[0], q.dtype
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
    return out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(dtype)  # (B, N, h*d)


class Attention(nn.Module):
    """Multi-head attention of `query_dim` tokens onto context tokens (onto themselves without context)."""

    def __init__(
        self,
        query_dim: int,
        *,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (B, M, C_ctx)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N, inner), (B, M, inner) x2
        return self.to_out[0](attention(q, k, v, heads=self.heads, upcast=self.upcast_attention))  # (B, N, C)


class SpatialSelfAttention(Attention):
    """Self-attention over the pixels of a feature map, with GroupNorm and residual (the VAE's mid block)."""

    def __init__(self, channels: int, *, heads: int = 1, norm_num_groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=heads, dim_head=channels // heads, bias=True)
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        out = super().forward(tokens)  # (B, HW, C)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class GEGLU(nn.Module):
    """Gated GELU, x * gelu(gate) with [x, gate] = proj(input) (Shazeer 2020, "GLU Variants", eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU up-projection to `mult * dim`, then a linear back to `dim` (`net.0`, `net.2` as in diffusers)."""

    def __init__(self, dim: int, *, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on `context`, feed-forward; each added to the residual stream.

    With `only_cross_attention` the first attention also attends to `context`, not to the tokens.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        cross_attention_dim: int,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        heads = {
            "heads": num_attention_heads,
            "dim_head": attention_head_dim,
            "upcast_attention": upcast_attention,
        }
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x  # (B, N, dim)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Transformer blocks over the pixels of a feature map: norm, project in, blocks, project out, residual.

    `use_linear_projection` selects linear projections on tokens (SD 2.x, SDXL) instead of 1x1 convs (SD 1.x).
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        num_layers: int = 1,
        cross_attention_dim: int,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        proj = nn.Linear if use_linear_projection else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = proj(in_channels, inner_dim)
        block = {"cross_attention_dim": cross_attention_dim, "only_cross_attention": only_cross_attention}
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, num_attention_heads, attention_head_dim, upcast_attention=upcast_attention, **block
            )
            for _ in range(num_layers)
        )
        self.proj_out = proj(inner_dim, in_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens, (h, w) = self.tokens_in(self.norm(x)), x.shape[-2:]  # (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.tokens_out(tokens, h, w) + x  # (B, C, H, W)

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, HW, inner), projecting before flattening (conv) or after (linear)."""
        if not self.use_linear_projection:
            x = self.proj_in(x)
        tokens = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
        return self.proj_in(tokens) if self.use_linear_projection else tokens

    def tokens_out(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, HW, inner) -> (B, C, H, W), the inverse of `tokens_in`."""
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
        x = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return x if self.use_linear_projection else self.proj_out(x)

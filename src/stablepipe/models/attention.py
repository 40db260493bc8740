"""Attention layers: multi-head attention, the transformer block of the UNet, and its 2-d wrapper.

Multi-head scaled dot-product attention is eq. (1) and sec. 3.2.2 of Vaswani et al. 2017; the transformer
block (self-attention, cross-attention on the text, GEGLU feed-forward, each pre-normed and residual) is the
`SpatialTransformer` of latent diffusion (Rombach et al. 2022, appendix). Attention runs through
`stablepipe.kernels.scaled_dot_product_attention`: the compiled CPU kernel for bfloat16 where it applies, else
`torch.nn.functional.scaled_dot_product_attention`. Module names are diffusers' state-dict names.

Two options change how attention runs, never what it computes: attention slicing (`set_attention_slice`: the
batch x heads are processed a few at a time) and fused projections (`fuse_qkv_projections`: one matrix
multiply for q, k and v, whose weights become views into one fused weight, so fusing costs no memory).
Feature maps may be channels-last (`model.to(memory_format=torch.channels_last)`); the layers keep the format.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stablepipe.kernels.attention import scaled_dot_product_attention
from stablepipe.models.base import checkpointed

# ---- attention as a function ------------------------------------------------------------------------------


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d), made contiguous: the CPU flash kernel runs faster on it."""
    b, n, width = t.shape
    return t.view(b, n, heads, width // heads).transpose(1, 2).contiguous()  # (B, h, N, d)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int) -> torch.Tensor:
    """Attention over the (batch x heads) rows `slice_size` at a time, as diffusers' sliced processor: (B, h, N, d).

    Every slice is an exact sub-problem, so the result is that of one call; only the working set shrinks."""
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))  # (B*h, N, d), (B*h, M, d) x2
    out = torch.empty_like(q)  # (B*h, N, d)
    for start in range(0, b * h, slice_size):
        rows = slice(start, start + slice_size)
        out[rows] = F.scaled_dot_product_attention(q[rows], k[rows], v[rows])
    return out.view(b, h, n, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int,
    upcast: bool = False,
    slice_size: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over `heads` heads: (B, N, heads*d), (B, M, heads*d) x2 -> (B, N, heads*d).

    With `upcast`, half-precision inputs are computed in float32: SD 2.1 overflows where scores are computed in
    float16 (torch's fused kernels accumulate in float32 already, so on them this costs time, not accuracy).
    `slice_size` runs that many (batch x head) rows at a time (see `sliced_attention`).
    """
    dtype = q.dtype
    q, k, v = (split_heads(t, heads) for t in (q, k, v))  # (B, h, N, d), (B, h, M, d) x2
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if slice_size is None or slice_size >= q.shape[0] * heads:
        out = scaled_dot_product_attention(q, k, v)  # (B, h, N, d): the compiled kernel where it applies
    else:
        out = sliced_attention(q, k, v, slice_size)
    return merge_heads(out).to(dtype)  # (B, N, h*d)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, heads: int, upcast: bool = False
) -> torch.Tensor:
    """`attention` with an additive `mask` broadcastable to (B, heads, N, M): (B, N, heads*d)."""
    dtype = q.dtype
    q, k, v = (split_heads(t, heads) for t in (q, k, v))  # (B, h, N, d), (B, h, M, d) x2
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (B, h, N, d)
    return merge_heads(out).to(dtype)  # (B, N, h*d)


# ---- attention processors: how an `Attention` module computes, swappable (diffusers' processor API) -------


def _flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B, HW, C) tokens; tokens stay as they are."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


class AttnProcessor2_0:
    """stablepipe's default: fused scaled dot-product attention (the compiled kernel where it applies).

    Called as diffusers calls its processors, `processor(attn, hidden_states, encoder_hidden_states,
    attention_mask)`, on (B, N, C) tokens or (B, C, H, W) feature maps (the VAE's attention, which adds its
    group norm and residual). `attention_mask` is additive, (B, M) or (B, 1, M); diffusers' processors work on
    stablepipe's `Attention` modules too, and these on diffusers'.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q, k, v = self.projections(attn, hidden_states, encoder_hidden_states)
        out = self.attend(attn, q, k, v, attention_mask)  # (B, N, inner)
        return self.output(attn, out, hidden_states)

    def projections(self, attn, hidden_states, encoder_hidden_states) -> tuple[torch.Tensor, ...]:
        """q (B, N, inner) of the (normed) tokens, k and v (B, M, inner) of the context (of the tokens without)."""
        tokens = _flatten_pixels(hidden_states)  # (B, N, C)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        context = tokens if encoder_hidden_states is None else encoder_hidden_states  # (B, M, C_ctx)
        if attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(context)
        return attn.project(tokens, context) if hasattr(attn, "project") else _project(attn, tokens, context)

    def output(self, attn, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The attended values (B, N, inner) through `to_out`, in the input's layout (plus its residual)."""
        out = attn.to_out[1](attn.to_out[0](out))  # (B, N, C)
        return _finish(attn, out, hidden_states)

    def attend(self, attn, q, k, v, attention_mask) -> torch.Tensor:
        upcast = getattr(attn, "upcast_attention", False)
        if attention_mask is None:
            return attention(q, k, v, heads=attn.heads, upcast=upcast, slice_size=getattr(attn, "slice_size", None))
        mask = attn.prepare_attention_mask(attention_mask, k.shape[1], q.shape[0], out_dim=4)  # (B, h, ., M)
        return masked_attention(q, k, v, mask, heads=attn.heads, upcast=upcast)


class AttnProcessor(AttnProcessor2_0):
    """Attention written out, softmax(q kᵀ · scale + mask) v through `attn.get_attention_scores`: what
    `set_default_attn_processor` selects, as in diffusers. Slower than `AttnProcessor2_0`, same result."""

    def attend(self, attn, q, k, v, attention_mask) -> torch.Tensor:
        mask = attn.prepare_attention_mask(attention_mask, k.shape[1], q.shape[0])  # (B*h, 1, M) or None
        q, k, v = (attn.head_to_batch_dim(t) for t in (q, k, v))  # (B*h, N, d), (B*h, M, d) x2
        probs = attn.get_attention_scores(q, k, mask)  # (B*h, N, M)
        return attn.batch_to_head_dim(torch.bmm(probs, v))  # (B, N, h*d)


def _project(attn, tokens: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return attn.to_q(tokens), attn.to_k(context), attn.to_v(context)


def _finish(attn, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """Tokens back to the input's layout, plus the residual and output rescale of the module's config."""
    if hidden_states.ndim == 4:
        out = out.transpose(1, 2).reshape(hidden_states.shape)  # (B, C, H, W)
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else out


# ---- IP-Adapter: decoupled cross-attention on image tokens --------------------------------------------------


def split_image_context(context, num_tokens: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The (text, [image tokens per adapter]) that an IP-Adapter UNet passes as its context, as diffusers does.

    A plain tensor is diffusers' older form, the image tokens of one adapter appended to the text: split off
    its last `num_tokens` tokens."""
    if isinstance(context, tuple):
        text, image = context
        return text, list(image)
    if context is None:
        raise ValueError(
            "an IP-Adapter attention processor got no context: it belongs on cross-attention layers, called with "
            "(text embeds, [image embeds]) as a UNet with a loaded IP-Adapter passes them"
        )
    return context[:, :-num_tokens], [context[:, -num_tokens:]]


def image_tokens_per_sample(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """(E * B, [n_images,] T, D) image tokens -> (B, E * n_images * T, D): each sample attends to all of its
    images' tokens at once. E > 1 rows per sample are read as more images, as diffusers' reshape reads them."""
    if tokens.shape[0] % batch:
        raise ValueError(
            f"IP-Adapter image embeds have batch {tokens.shape[0]}, which does not divide into the UNet's batch of "
            f"{batch}: give one row of image embeds per sample (with guidance: negative rows first, then positive)"
        )
    return tokens.reshape(batch, -1, tokens.shape[-1])


def downsample_ip_mask(mask: torch.Tensor, batch: int, num_queries: int) -> torch.Tensor:
    """An IP-Adapter mask (1 or B, H, W) resized to the `num_queries` tokens of a layer: (B, N, 1).

    The token grid is read off N and the mask's aspect ratio, h = ceil(sqrt(N / ratio)), w = N // h, as in
    diffusers' `IPAdapterMaskProcessor.downsample`; a grid of another size is padded with 0 or cut to N."""
    height, width = mask.shape[-2:]
    rows = int(math.sqrt(num_queries / (width / height)))
    rows += int(num_queries % rows != 0)
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"an IP-Adapter mask has batch {mask.shape[0]}; give 1 (for every sample) or {batch}")
    small = F.interpolate(mask[None], size=(rows, num_queries // rows), mode="bicubic")[0]  # (1 or B, h, w)
    flat = small.expand(batch, -1, -1).reshape(batch, -1)  # (B, h * w)
    if flat.shape[1] != num_queries:
        warnings.warn(
            "the IP-Adapter mask's aspect ratio does not match the picture's; give masks of the picture's size",
            UserWarning,
            stacklevel=2,
        )
        flat = F.pad(flat, (0, num_queries - flat.shape[1])) if flat.shape[1] < num_queries else flat[:, :num_queries]
    return flat[..., None]  # (B, N, 1)


def check_ip_masks(masks, scales: list, image_tokens: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """`cross_attention_kwargs["ip_adapter_masks"]`: one (1, n_images, H, W) mask (or None) per adapter."""
    if masks is None:
        return [None] * len(scales)
    if torch.is_tensor(masks):
        masks = list(masks.unsqueeze(1))  # diffusers' older form: (n_adapters, 1, H, W)
    if not len(masks) == len(scales) == len(image_tokens):
        raise ValueError(
            f"ip_adapter_masks has {len(masks)} entries for {len(scales)} IP-Adapters ({len(image_tokens)} image "
            "embeds); give one mask (or None) per adapter"
        )
    for index, (mask, scale, tokens) in enumerate(zip(masks, scales, image_tokens)):
        if mask is None:
            continue
        if not torch.is_tensor(mask) or mask.ndim != 4:
            raise ValueError(
                f"ip_adapter_masks[{index}] must be a tensor (1, n_images, height, width), got "
                f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}"
            )
        if mask.shape[1] != tokens.shape[1]:
            raise ValueError(f"ip_adapter_masks[{index}] has {mask.shape[1]} masks for {tokens.shape[1]} images")
        if isinstance(scale, list) and len(scale) != mask.shape[1]:
            raise ValueError(f"ip_adapter_masks[{index}] has {mask.shape[1]} masks for {len(scale)} scales")
    return list(masks)


class IPAdapterAttnProcessor2_0(nn.Module):
    """Cross-attention on the text plus, for every loaded IP-Adapter, attention on its image tokens: out =
    attn(q, K_text, V_text) + scale * attn(q, K_ip, V_ip) (Ye et al. 2023, "IP-Adapter", eq. 5, decoupled
    cross-attention). `to_k_ip[i]` / `to_v_ip[i]` are adapter i's projections and `scale[i]` its weight (0 skips
    it; a list gives one weight per masked image). Attention runs as `AttnProcessor2_0` (the kernel path).
    Called as diffusers calls it, with `encoder_hidden_states=(text, [image tokens per adapter])`."""

    text_attention = AttnProcessor2_0()

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, num_tokens=(4,), scale=1.0):
        super().__init__()
        num_tokens = list(num_tokens) if isinstance(num_tokens, (tuple, list)) else [num_tokens]
        scale = scale if isinstance(scale, list) else [scale] * len(num_tokens)
        if len(scale) != len(num_tokens):
            raise ValueError(f"got {len(scale)} scales for {len(num_tokens)} IP-Adapters; give one per adapter")
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.num_tokens, self.scale = num_tokens, scale
        width = cross_attention_dim or hidden_size
        self.to_k_ip = nn.ModuleList(nn.Linear(width, hidden_size, bias=False) for _ in num_tokens)
        self.to_v_ip = nn.ModuleList(nn.Linear(width, hidden_size, bias=False) for _ in num_tokens)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None, **kwargs):  # fmt: skip
        text, image_tokens = split_image_context(encoder_hidden_states, self.num_tokens[0])
        base = self.text_attention
        q, k, v = base.projections(attn, hidden_states, text)
        out = base.attend(attn, q, k, v, attention_mask)  # (B, N, inner)
        masks = check_ip_masks(ip_adapter_masks, self.scale, image_tokens)
        for i, (tokens, weight, mask) in enumerate(zip(image_tokens, self.scale, masks)):
            if all(w == 0 for w in (weight if isinstance(weight, list) else [weight])):
                continue  # a switched-off adapter costs nothing
            out = self.add_adapter(attn, q, out, tokens, i, weight, mask)
        return base.output(attn, out, hidden_states)

    def add_adapter(self, attn, q, out, tokens, i: int, weight, mask) -> torch.Tensor:
        """`out` plus adapter i's image attention: on all its images at once, or image by image under a mask."""
        if mask is None:
            if isinstance(weight, list):
                raise ValueError("a list of IP-Adapter scales (one per image) needs ip_adapter_masks; give a float")
            return out + weight * self.image_attention(attn, q, tokens, i)  # (B, N, inner)
        weights = weight if isinstance(weight, list) else [weight] * mask.shape[1]
        for j in range(mask.shape[1]):
            region = downsample_ip_mask(mask[:, j], q.shape[0], q.shape[1]).to(q.device, q.dtype)  # (B, N, 1)
            out = out + weights[j] * (self.image_attention(attn, q, tokens[:, j], i) * region)
        return out

    def image_attention(self, attn, q: torch.Tensor, tokens: torch.Tensor, i: int) -> torch.Tensor:
        """softmax(q K_ip^T / sqrt(d)) V_ip on adapter i's image tokens: (B, N, inner)."""
        k = image_tokens_per_sample(self.to_k_ip[i](tokens), q.shape[0])  # (B, M, inner)
        v = image_tokens_per_sample(self.to_v_ip[i](tokens), q.shape[0])
        return self.text_attention.attend(attn, q, k, v, None)


class IPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """`IPAdapterAttnProcessor2_0` with attention written out (`AttnProcessor`); same result."""

    text_attention = AttnProcessor()


# ---- the attention module -----------------------------------------------------------------------------------


def _has_hooks(*layers: nn.Module) -> bool:
    """Whether any layer runs hooks (LoRA adapters, sequential offload): those need the layer itself called."""
    return any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


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
        out_bias: bool = True,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.is_cross_attention = cross_attention_dim is not None
        self.slice_size: int | None = None
        self.fused_projections = False
        self._fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (weight, bias) the projections view
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self._register_state_dict_hook(_unshare_fused_weights)
        # what diffusers' processors read from the module (the VAE's attention sets its own)
        self.scale = dim_head**-0.5
        self.group_norm: nn.Module | None = None
        self.norm_cross: nn.Module | None = None
        self.spatial_norm = self.norm_q = self.norm_k = None
        self.residual_connection = False
        self.rescale_output_factor = 1.0
        self.processor = AttnProcessor2_0()

    @property
    def sliceable_head_dim(self) -> int:
        """How many heads a slice can hold at most (diffusers' name)."""
        return self.heads

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute attention `slice_size` (batch x head) rows at a time; None: all at once."""
        if slice_size is not None and not (isinstance(slice_size, int) and 1 <= slice_size <= self.heads):
            raise ValueError(f"slice_size must be None or an int in [1, {self.heads}] (heads), got {slice_size!r}")
        self.slice_size = slice_size

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        """(B, N, C) tokens (or a (B, C, H, W) map) attending to `context` (B, M, C_ctx), or to themselves."""
        return self.processor(self, x, context, attention_mask, **cross_attention_kwargs)

    def set_processor(self, processor) -> None:
        """Use `processor` from now on. A processor that is a module (IP-Adapter's, with weights) becomes a
        submodule, so it moves with `.to()` and its weights are in the state dict, as in diffusers."""
        if not isinstance(processor, nn.Module):
            self._modules.pop("processor", None)  # a module processor is replaced by a plain one
        self.processor = processor

    def get_processor(self, return_deprecated_lora: bool = False):
        return self.processor

    # -- what diffusers' processors call on the module ---------------------------------------------------------

    def head_to_batch_dim(self, t: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """(B, N, h*d) -> (B*h, N, d), or (B, h, N, d) with out_dim=4."""
        heads = split_heads(t, self.heads)  # (B, h, N, d)
        return heads if out_dim == 4 else heads.flatten(0, 1)

    def batch_to_head_dim(self, t: torch.Tensor) -> torch.Tensor:
        """(B*h, N, d) -> (B, N, h*d)."""
        return merge_heads(t.unflatten(0, (-1, self.heads)))

    def get_attention_scores(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """softmax(q kᵀ · scale + mask) on (B*h, N, d), (B*h, M, d): (B*h, N, M), in the query's dtype."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.bmm(query, key.transpose(1, 2)) * self.scale  # (B*h, N, M)
        if attention_mask is not None:
            scores = scores + attention_mask
        return scores.float().softmax(dim=-1).to(dtype)

    def prepare_attention_mask(
        self, attention_mask: torch.Tensor, target_length: int, batch_size: int, out_dim: int = 3
    ) -> torch.Tensor:
        """An additive (B, M) / (B, 1, M) mask padded with zeros to `target_length` keys and repeated per head:
        (B*h, 1, M) for out_dim=3, (B, h, 1, M) for out_dim=4."""
        if attention_mask is None:
            return None
        if attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None]  # (B, 1, M)
        if attention_mask.shape[-1] < target_length:
            attention_mask = F.pad(attention_mask, (0, target_length - attention_mask.shape[-1]), value=0.0)
        if out_dim == 4:
            return attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)  # (B, h, 1, M)
        if attention_mask.shape[0] < batch_size * self.heads:
            attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)  # (B*h, 1, M)
        return attention_mask

    def norm_encoder_hidden_states(self, context: torch.Tensor) -> torch.Tensor:
        return self.norm_cross(context)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v: three projections, or one (two for cross-attention) when fused."""
        fusable = self.fused_projections and (self.is_cross_attention or context is x)  # q, k, v of one input
        fused = self.fused_weight() if fusable and not _has_hooks(*self.fused_layers()) else None
        if fused is None:
            return self.to_q(x), self.to_k(context), self.to_v(context)
        weight, bias = fused
        if self.is_cross_attention:
            return (self.to_q(x), *F.linear(context, weight, bias).chunk(2, dim=-1))  # (B, M, inner) x2
        return F.linear(x, weight, bias).chunk(3, dim=-1)  # (B, N, inner) x3

    # -- fused projections ---------------------------------------------------------------------------------------

    def fused_layers(self) -> tuple[nn.Linear, ...]:
        """What fusing joins: q, k, v for self-attention; k, v for cross-attention (their input is the text)."""
        return (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)

    def fuse_projections(self) -> None:
        """Join the projections' weights into one matrix; each projection's weight becomes a view of it."""
        layers = self.fused_layers()
        weight = torch.cat([layer.weight.detach() for layer in layers])  # (n * inner, C_in)
        has_bias = layers[0].bias is not None
        bias = torch.cat([layer.bias.detach() for layer in layers]) if has_bias else None  # (n * inner,)
        rows = 0
        for layer in layers:
            n = layer.weight.shape[0]
            layer.weight = nn.Parameter(weight[rows : rows + n], requires_grad=layer.weight.requires_grad)
            if has_bias:
                layer.bias = nn.Parameter(bias[rows : rows + n], requires_grad=layer.bias.requires_grad)
            rows += n
        self._fused = (weight, bias)
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        """Back to separate projections (each keeps its own copy of its weights)."""
        if self.fused_projections:
            for layer in self.fused_layers():
                layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
                if layer.bias is not None:
                    layer.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        self._fused = None
        self.fused_projections = False

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused (weight, bias), fused again first if a weight stopped being a view of it (weights were
        moved, cast or replaced): the projections' own weights are always the truth. Inside torch.compile the
        check is skipped (it would break the graph; compiled code assumes fixed weights anyway)."""
        if torch.compiler.is_compiling():
            return self._fused
        layers = self.fused_layers()
        if self._fused is None or not _views_of(self._fused, layers):
            self.fuse_projections()
        return self._fused

    def _apply(self, fn, recurse: bool = True):
        self._fused = None  # moving or casting converts each projection; fuse again (no stale copy is kept)
        super()._apply(fn, recurse)
        if self.fused_projections:
            self.fuse_projections()
        return self


def _views_of(fused: tuple[torch.Tensor, torch.Tensor | None], layers: tuple[nn.Linear, ...]) -> bool:
    """Whether the layers' weights (and biases) are still the consecutive row blocks of the fused ones, in order."""
    for whole, parts in zip(fused, ([m.weight for m in layers], [m.bias for m in layers])):
        if whole is None:
            continue
        rows = 0
        for part in parts:
            if part is None or part.device != whole.device or part.dtype != whole.dtype:
                return False
            if part.data_ptr() != whole[rows:].data_ptr():
                return False
            rows += part.shape[0]
        if rows != whole.shape[0]:
            return False
    return True


def _unshare_fused_weights(module: Attention, state: dict, prefix: str, local_metadata) -> None:
    """State dicts of a fused module hold copies: saved files must not see one tensor under three names."""
    if module.fused_projections:
        for name in ("to_q", "to_k", "to_v"):
            for kind in ("weight", "bias"):
                key = f"{prefix}{name}.{kind}"
                if key in state and state[key] is not None:
                    state[key] = state[key].clone()


# ---- model-level options (diffusers' method names) -----------------------------------------------------------


def attention_modules(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def resolve_slice_sizes(slice_size: str | int | list | None, head_counts: list[int]) -> list[int | None]:
    """diffusers' `set_attention_slice` argument, one entry per attention layer: "auto" halves the heads, "max"
    is one head at a time, an int is used for every layer, a list gives one per layer, None turns slicing off."""
    if slice_size == "auto":
        sizes = [max(1, h // 2) for h in head_counts]
    elif slice_size == "max":
        sizes = [1] * len(head_counts)
    elif isinstance(slice_size, (list, tuple)):
        sizes = list(slice_size)
    elif slice_size is None or isinstance(slice_size, int):
        sizes = [slice_size] * len(head_counts)
    else:
        raise ValueError(f'slice_size must be "auto", "max", an int, a list of ints or None; got {slice_size!r}')
    if len(sizes) != len(head_counts):
        raise ValueError(f"got {len(sizes)} slice sizes for {len(head_counts)} attention layers; give one per layer")
    for size, heads in zip(sizes, head_counts):
        if size is not None and (not isinstance(size, int) or not 1 <= size <= heads):
            raise ValueError(f"slice size {size!r} must be an int in [1, {heads}] (the layer's heads) or None")
    return sizes


class AttentionSlicingMixin:
    """`set_attention_slice` for models with attention layers (diffusers' UNet method)."""

    def set_attention_slice(self, slice_size: str | int | list[int] | None = "auto") -> None:
        """Compute attention a few (batch x head) rows at a time: "auto" (half the heads), "max" (one), an int,
        one int per attention layer, or None (off). The output is unchanged; only the working set shrinks."""
        layers = attention_modules(self)
        for layer, size in zip(layers, resolve_slice_sizes(slice_size, [m.sliceable_head_dim for m in layers])):
            layer.set_attention_slice(size)


class AttentionProcessorMixin:
    """diffusers' processor API on a model: `attn_processors`, `set_attn_processor`, `set_default_attn_processor`.

    Processors are named by their module's path plus ".processor" (`down_blocks.1.attentions.0.transformer_blocks
    .0.attn1.processor`), as in diffusers, so a dict of them built for a diffusers model fits this one."""

    @property
    def attn_processors(self) -> dict[str, Any]:
        return {f"{name}.processor": m.processor for name, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor) -> None:
        """One processor for every attention layer, or a dict {name: processor} naming each one."""
        layers = {f"{name}.processor": m for name, m in self.named_modules() if isinstance(m, Attention)}
        if isinstance(processor, dict):
            if len(processor) != len(layers) or set(processor) - set(layers):
                missing, extra = sorted(set(layers) - set(processor)), sorted(set(processor) - set(layers))
                raise ValueError(
                    f"the number of processors ({len(processor)}) does not match the {len(layers)} attention layers; "
                    f"give one for each, named as in model.attn_processors (missing {missing[:3]}, unknown {extra[:3]})"
                )
            for name, layer in layers.items():
                layer.set_processor(processor[name])
            return
        for layer in layers.values():
            layer.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Back to plain attention (`AttnProcessor`, as diffusers), dropping custom processors."""
        self.set_attn_processor(AttnProcessor())


class FusedProjectionsMixin:
    """`fuse_qkv_projections` / `unfuse_qkv_projections` (diffusers' model methods)."""

    def fuse_qkv_projections(self) -> None:
        """One matrix multiply for q, k, v in self-attention (k, v in cross-attention); same results."""
        for layer in attention_modules(self):
            layer.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for layer in attention_modules(self):
            layer.unfuse_projections()


# ---- the UNet's transformer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionArgs:
    """What a UNet call passes to every attention layer besides the text: diffusers' `attention_mask` (on the
    pixels), `encoder_attention_mask` (on the text tokens; both additive, (B, N) / (B, M)) and the
    `cross_attention_kwargs` for custom processors."""

    attention_mask: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    def masks_and_kwargs(self) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
        return self.attention_mask, self.encoder_attention_mask, self.processor_kwargs


class SpatialSelfAttention(Attention):
    """Self-attention over the pixels of a feature map, with GroupNorm and residual (the VAE's mid block)."""

    def __init__(self, channels: int, *, heads: int = 1, norm_num_groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=heads, dim_head=channels // heads, bias=True)
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=eps, affine=True)
        self.residual_connection = True  # the processor norms, attends over the pixels, and adds x back


class GEGLU(nn.Module):
    """Gated GELU, x * gelu(gate) with [x, gate] = proj(input) (Shazeer 2020, "GLU Variants", eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return F.gelu(gate).mul_(x)  # the product written into gelu's fresh output


class GELU(nn.Module):
    """A linear layer, then GELU (Hendrycks & Gimpel 2016): the up-projection of IP-Adapter's image projections."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu": GELU}


class FeedForward(nn.Module):
    """An up-projection to `mult * dim` with its activation (GEGLU in the UNet), then a linear to `dim_out`
    (default `dim`); `net.0`, `net.2` as in diffusers."""

    def __init__(
        self, dim: int, dim_out: int | None = None, *, mult: float = 4, activation: str = "geglu", bias: bool = True
    ):
        super().__init__()
        if activation not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(FEED_FORWARD_ACTIVATIONS)}, got {activation!r}")
        inner = int(dim * mult)
        up = FEED_FORWARD_ACTIVATIONS[activation](dim, inner, bias=bias)
        self.net = nn.ModuleList([up, nn.Dropout(0.0), nn.Linear(inner, dim_out or dim, bias=bias)])

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

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attention: AttentionArgs | None = None
    ) -> torch.Tensor:
        # each sub-layer's output is fresh, so the residual is added into it in place
        mask1, mask2, kwargs = attention.masks_and_kwargs() if attention is not None else (None, None, {})
        self_context = context if self.only_cross_attention else None
        x = self.attn1(self.norm1(x), self_context, mask2 if self.only_cross_attention else mask1, **kwargs).add_(x)
        x = self.attn2(self.norm2(x), context, mask2, **kwargs).add_(x)  # (B, N, dim)
        return self.ff(self.norm3(x)).add_(x)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided feature map, else the default (NCHW) format."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


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
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor, attention: AttentionArgs | None = None) -> torch.Tensor:
        tokens, (h, w) = self.tokens_in(self.norm(x)), x.shape[-2:]  # (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = checkpointed(self, block, tokens, context, attention)
        return self.tokens_out(tokens, h, w, memory_format_of(x)).add_(x)  # (B, C, H, W)

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, HW, inner), projecting before flattening (conv) or after (linear).
        The flattening is free on a channels-last feature map."""
        if not self.use_linear_projection:
            x = self.proj_in(x)
        tokens = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
        return self.proj_in(tokens) if self.use_linear_projection else tokens

    def tokens_out(self, tokens: torch.Tensor, h: int, w: int, memory_format: torch.memory_format) -> torch.Tensor:
        """(B, HW, inner) -> (B, C, H, W) in `memory_format` (the input's), the inverse of `tokens_in`.
        The result is always a fresh tensor (never a view of `tokens`' storage shared elsewhere)."""
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
        x = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)  # NHWC-strided view
        if self.use_linear_projection:
            return x.contiguous(memory_format=memory_format)
        return self.proj_out(x.contiguous(memory_format=memory_format))

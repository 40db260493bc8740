"""Timestep embeddings (the sinusoidal or random Fourier features of a noise level, and the MLP on top) and
IP-Adapter's image projections."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from stablepipe.models.attention import Attention, FeedForward
from stablepipe.models.resnet import get_activation

StateDict = dict[str, torch.Tensor]


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


# ---- IP-Adapter image projections: CLIP image features -> tokens the cross-attention reads -------------------
# (Ye et al. 2023, "IP-Adapter", sec. 3.2). Module names are diffusers' (`loading/ip_adapter.py` converts the
# original files' names); each class records the width of the image features it takes, `image_embed_dim`.


class ImageProjection(nn.Module):
    """IP-Adapter: a linear map of the pooled CLIP image embedding to `num_image_text_embeds` tokens, layer-normed.
    (B, D_img) -> (B, T, D)."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768, num_image_text_embeds: int = 32):
        super().__init__()
        self.image_embed_dim, self.num_image_text_embeds = image_embed_dim, num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))  # (B, T * D)
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))  # (B, T, D)


class IPAdapterFullImageProjection(nn.Module):
    """IP-Adapter Full Face: every CLIP hidden state through a GELU MLP and a layer norm. (B, T, D_img) -> (B, T, D)."""

    def __init__(self, image_embed_dim: int = 1024, cross_attention_dim: int = 1024):
        super().__init__()
        self.image_embed_dim = image_embed_dim
        self.ff = FeedForward(image_embed_dim, cross_attention_dim, mult=1, activation="gelu")
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.ff(image_embeds))


class IPAdapterFaceIDImageProjection(nn.Module):
    """IP-Adapter FaceID: a face-ID embedding through a GELU MLP to `num_tokens` layer-normed tokens.
    (B, D_id) -> (B, T, D)."""

    def __init__(
        self, image_embed_dim: int = 1024, cross_attention_dim: int = 1024, mult: int = 1, num_tokens: int = 1
    ):
        super().__init__()
        self.image_embed_dim, self.num_tokens = image_embed_dim, num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.ff = FeedForward(image_embed_dim, cross_attention_dim * num_tokens, mult=mult, activation="gelu")
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.ff(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)  # (B, T, D)
        return self.norm(tokens)


class IPAdapterPlusImageProjectionBlock(nn.Module):
    """One resampler layer: learned queries attend to [image features, queries], then a GELU MLP; both residual."""

    def __init__(self, embed_dims: int = 768, dim_head: int = 64, heads: int = 16, ffn_ratio: float = 4):
        super().__init__()
        self.ln0 = nn.LayerNorm(embed_dims)  # on the image features
        self.ln1 = nn.LayerNorm(embed_dims)  # on the queries
        self.attn = Attention(embed_dims, dim_head=dim_head, heads=heads, out_bias=False)
        mlp = FeedForward(embed_dims, embed_dims, mult=ffn_ratio, activation="gelu", bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(embed_dims), mlp)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        queries = self.ln1(latents)  # (B, Q, C)
        context = torch.cat([self.ln0(x), queries], dim=-2)  # (B, T + Q, C)
        latents = self.attn(queries, context) + residual
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """IP-Adapter Plus: a Perceiver resampler (Jaegle et al. 2021; Alayrac et al. 2022, Flamingo) whose
    `num_queries` learned queries read the CLIP image encoder's hidden states. (B, T, D_img) -> (B, Q, D)."""

    def __init__(
        self,
        embed_dims: int = 768,
        output_dims: int = 1024,
        hidden_dims: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 8,
        ffn_ratio: float = 4,
    ):
        super().__init__()
        self.image_embed_dim = embed_dims
        self.latents = nn.Parameter(torch.randn(1, num_queries, hidden_dims) / hidden_dims**0.5)
        self.proj_in = nn.Linear(embed_dims, hidden_dims)
        self.proj_out = nn.Linear(hidden_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        self.layers = nn.ModuleList(
            IPAdapterPlusImageProjectionBlock(hidden_dims, dim_head, heads, ffn_ratio) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.shape[0], 1, 1)  # (B, Q, C)
        x = self.proj_in(x)  # (B, T, C)
        for block in self.layers:
            latents = block(x, latents, latents)
        return self.norm_out(self.proj_out(latents))  # (B, Q, D)


class MultiIPAdapterImageProjection(nn.Module):
    """The image projections of all loaded IP-Adapters: the UNet's `encoder_hid_proj` with IP-Adapters loaded.

    Takes one tensor per adapter, (B, n_images, [T,] D_img), and gives (B, n_images, tokens, D) for each."""

    def __init__(self, IPAdapterImageProjectionLayers: list[nn.Module] | tuple[nn.Module, ...]):  # noqa: N803
        super().__init__()
        self.image_projection_layers = nn.ModuleList(IPAdapterImageProjectionLayers)

    @property
    def num_ip_adapters(self) -> int:
        return len(self.image_projection_layers)

    def forward(self, image_embeds: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if torch.is_tensor(image_embeds):
            warnings.warn(
                "image_embeds as one tensor is deprecated (as in diffusers); give a list, one tensor per IP-Adapter",
                FutureWarning,
                stacklevel=2,
            )
            image_embeds = [image_embeds.unsqueeze(1)]  # one adapter, one image per sample
        if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != self.num_ip_adapters:
            count = len(image_embeds) if isinstance(image_embeds, (list, tuple)) else type(image_embeds).__name__
            raise ValueError(f"got image_embeds for {count} IP-Adapters but {self.num_ip_adapters} are loaded; "
                             "give one tensor per adapter")  # fmt: skip
        return [self.project(i, embeds) for i, embeds in enumerate(image_embeds)]

    def project(self, i: int, embeds: torch.Tensor) -> torch.Tensor:
        """Adapter i's projection of (B, n, [T,] D_img) embeds: (B, n, tokens, D)."""
        layer = self.image_projection_layers[i]
        width = getattr(layer, "image_embed_dim", None)
        if embeds.ndim < 3 or (width is not None and embeds.shape[-1] != width):
            raise ValueError(
                f"image embeds for IP-Adapter {i} have shape {tuple(embeds.shape)}; it takes (batch, n_images, "
                f"[tokens,] {width}): image features of the image encoder this adapter was trained with"
            )
        b, n = embeds.shape[:2]
        tokens = layer(embeds.reshape(b * n, *embeds.shape[2:]))  # (B * n, T, D)
        return tokens.reshape(b, n, *tokens.shape[1:])  # (B, n, T, D)


# ---- the projections of IP-Adapter files: the original (Tencent AI Lab) key names -> these modules --------------


def _renamed(state: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """`state` with each key rewritten by the first matching (pattern, replacement); to_kv split into to_k, to_v."""
    out: StateDict = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        if ".to_kv." in key:
            out[key.replace(".to_kv.", ".to_k.")], out[key.replace(".to_kv.", ".to_v.")] = value.chunk(2, dim=0)
        else:
            out[key] = value
    return out


MLP_RULES = [(r"^proj\.0\.", "ff.net.0.proj."), (r"^proj\.2\.", "ff.net.2.")]
PLUS_RULES = [
    (r"^layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"^layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"^layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"^layers\.(\d+)\.attn\.to_out\.(weight|bias)$", r"layers.\1.attn.to_out.0.\2"),
    (r"^layers\.(\d+)\.0\.to_", r"layers.\1.attn.to_"),
    (r"^layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"^layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"^layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
]


def _plain(s: StateDict) -> tuple[nn.Module, StateDict, int]:
    width = s["norm.weight"].shape[0]
    tokens = s["proj.weight"].shape[0] // width
    module = ImageProjection(s["proj.weight"].shape[1], width, tokens)
    return module, _renamed(s, [(r"^proj\.", "image_embeds.")]), tokens


def _full(s: StateDict) -> tuple[nn.Module, StateDict, int]:
    module = IPAdapterFullImageProjection(s["proj.0.weight"].shape[1], s["proj.3.weight"].shape[0])
    return module, _renamed(s, [*MLP_RULES, (r"^proj\.3\.", "norm.")]), 257  # 256 patches + the CLS token


def _face_id(s: StateDict) -> tuple[nn.Module, StateDict, int]:
    width, (hidden, embed_dim) = s["norm.weight"].shape[0], s["proj.0.weight"].shape
    tokens = s["proj.2.weight"].shape[0] // width
    module = IPAdapterFaceIDImageProjection(embed_dim, width, mult=hidden // embed_dim, num_tokens=tokens)
    return module, _renamed(s, MLP_RULES), 4  # diffusers' count (only its older context form reads it)


def _plus(s: StateDict) -> tuple[nn.Module, StateDict, int]:
    renamed = _renamed(s, PLUS_RULES)
    depth = 1 + max(int(k.split(".")[1]) for k in renamed if k.startswith("layers."))
    _, queries, hidden = s["latents"].shape
    module = IPAdapterPlusImageProjection(
        embed_dims=s["proj_in.weight"].shape[1], output_dims=s["proj_out.weight"].shape[0], hidden_dims=hidden,
        depth=depth, heads=renamed["layers.0.attn.to_q.weight"].shape[0] // 64, num_queries=queries,
    )  # heads of 64 channels, as the released files and diffusers have them
    return module, renamed, queries


def _face_id_plus(s: StateDict):
    raise NotImplementedError(
        "IP-Adapter FaceID Plus (a 'perceiver_resampler' in image_proj) is not supported by stablepipe yet; "
        "FaceID, Plus, Full Face and the plain IP-Adapters are"
    )


# (test on the image_proj keys, builder), first match wins, in diffusers' order of checks
IMAGE_PROJECTIONS: list[tuple[Callable[[StateDict], bool], Callable[[StateDict], tuple[nn.Module, StateDict, int]]]] = [
    (lambda s: "proj.weight" in s, _plain),
    (lambda s: "proj.3.weight" in s, _full),
    (lambda s: "perceiver_resampler.proj_in.weight" in s, _face_id_plus),
    (lambda s: "norm.weight" in s and "proj.0.weight" in s, _face_id),
    (lambda s: "latents" in s and "proj_in.weight" in s, _plus),
]


def image_projection_from_state_dict(state: StateDict, *, index: int = 0) -> tuple[nn.Module, int]:
    """Adapter `index`'s image projection with its weights, and the number of image tokens it makes."""
    for matches, build in IMAGE_PROJECTIONS:
        if matches(state):
            with torch.device("meta"):  # no random init (and no draw from torch's global generator)
                module, weights, tokens = build(state)
            load_exactly(module, weights, f"IP-Adapter {index}'s image_proj ({type(module).__name__})")
            return module, tokens
    raise ValueError(
        f"IP-Adapter {index}: its image_proj weights are of no known kind (plain, Plus, Full Face, FaceID); "
        f"keys {sorted(state)[:6]}"
    )


def load_exactly(module: nn.Module, weights: StateDict, what: str) -> None:
    """`weights` as the parameters of `module` (built on the meta device), every name and shape checked."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"wrong shapes {wrong[:4]}")  # fmt: skip
    module.load_state_dict(weights, assign=True)

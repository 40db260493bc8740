"""Textual-inversion embeddings (Gal et al. 2022): new tokens whose input embeddings were learned.

Files read: diffusers' `{token: (D,)}` (`learned_embeds.bin` / `.safetensors`), AUTOMATIC1111's `.pt`
(`{"string_to_param": {"*": (n, D)}, "name": ...}`) and `.safetensors` (`{"emb_params": (n, D)}`), and SDXL's
`{"clip_l": (n, 768), "clip_g": (n, 1280)}` (both encoders at once). An embedding of n vectors becomes the
tokens `name`, `name_1` ... `name_{n-1}`; prompts are expanded to all n by `expand_prompt` (called by the
shared tokenize stage), as diffusers does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SDXL_KEYS = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2")}
DEFAULT_WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def read_embedding_file(source: Any, *, weight_name: str | None, hub_kwargs: dict[str, Any]) -> Any:
    """A dict (or tensor) from a path, a folder or Hub repo, or as given."""
    from stablepipe.loading.checkpoint import SAFETENSORS_SUFFIXES, load_pickle, read_safetensors
    from stablepipe.loading.files import fetch_file

    if isinstance(source, Mapping | torch.Tensor):
        return source
    path = Path(source)
    if not path.is_file():
        names = [weight_name] if weight_name else list(DEFAULT_WEIGHT_NAMES)
        for name in names:
            try:
                path = fetch_file(source, name, **hub_kwargs)
                break
            except (OSError, FileNotFoundError):
                if name == names[-1]:
                    raise
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_safetensors(path).state
    return load_pickle(path)


def embeddings_by_encoder(data: Any, token: str | None, *, has_second: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, {"clip_l" or "clip_g": (n, D)}) for any supported file; "clip_l" is the first encoder."""
    if isinstance(data, torch.Tensor):
        if token is None:
            raise ValueError("this embedding is a bare tensor: pass the token to use, `token=...`")
        return token, {"clip_l": data}
    if not isinstance(data, Mapping):
        raise ValueError(f"not a textual-inversion embedding: the file holds a {type(data).__name__}, not tensors")
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise ValueError("not a textual-inversion embedding: its string_to_param has no '*' tensor")
        return token or str(data.get("name", "")), {"clip_l": params["*"]}
    if "emb_params" in data:  # AUTOMATIC1111 .safetensors
        return token or "", {"clip_l": data["emb_params"]}
    if set(data) & set(SDXL_KEYS):
        if not has_second:
            raise ValueError("this is an SDXL embedding (clip_l / clip_g); load it into an SDXL pipeline")
        return token or "", {k: data[k] for k in SDXL_KEYS if k in data}
    tensors = [(k, v) for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:  # diffusers: {token: (D,)}
        return token or tensors[0][0], {"clip_l": tensors[0][1]}
    raise ValueError(
        f"not a textual-inversion embedding: keys {sorted(map(str, data))[:5]}; expected {{token: tensor}}, "
        "string_to_param (AUTOMATIC1111 .pt), emb_params, or clip_l / clip_g (SDXL)"
    )


def token_names(token: str, vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_width(embedding: Any, text_encoder, *, encoder_name: str, where: str) -> None:
    """A clear error when an embedding is not (n, D) vectors or was trained for a text encoder of another width."""
    if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2) or not embedding.is_floating_point():
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ValueError(f"{where}: the embedding is {shape}, not floating-point vectors (n, D) or (D,)")
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if embedding.shape[-1] != width:
        raise ValueError(
            f"{where}: the embedding is {embedding.shape[-1]} wide but this text encoder's is {width} "
            f"({encoder_name}): it was trained for another model (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 and 1280); "
            "load an embedding made for this one"
        )


def add_embedding(tokenizer, text_encoder, token: str, embedding: torch.Tensor) -> None:
    """Add `token` (and `token_1` ... for more vectors) to the tokenizer and its rows to the encoder (whose width
    `check_width` has checked)."""
    vectors = embedding.reshape(-1, embedding.shape[-1])  # (n, D)
    names = token_names(token, vectors.shape[0])
    if taken := [n for n in names if n in tokenizer.get_vocab()]:
        raise ValueError(f"token {taken[0]!r} is already in the tokenizer; choose another `token=`")
    text_encoder.resize_token_embeddings(len(tokenizer) + len(names))
    table = text_encoder.get_input_embeddings().weight
    for name, vector in zip(names, vectors):
        tokenizer.add_tokens(name)
        table.data[tokenizer.convert_tokens_to_ids(name)] = vector.to(table)


def expand_prompt(tokenizer, prompt: str) -> str:
    """Write a multi-vector token as all its tokens: "<cat>" -> "<cat> <cat>_1 <cat>_2" (diffusers' rule)."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if not any(name.endswith("_1") for name in added):
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement, i = f"{replacement} {token}_{i}", i + 1
            prompt = prompt.replace(token, replacement)
    return prompt


class TextualInversionLoaderMixin:
    """`load_textual_inversion`, with diffusers' arguments."""

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: str | os.PathLike | Mapping | torch.Tensor | list,
        token: str | list[str] | None = None,
        tokenizer=None,
        text_encoder=None,
        *,
        weight_name: str | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Load one embedding or a list of them; SDXL files fill both text encoders."""
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) else [
            pretrained_model_name_or_path]
        tokens = token if isinstance(token, list) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(f"got {len(tokens)} tokens for {len(sources)} embeddings; give one token per embedding")
        for source, name in zip(sources, tokens):
            data = read_embedding_file(source, weight_name=weight_name, hub_kwargs=hub_kwargs)
            self._add_textual_inversion(data, name, tokenizer, text_encoder, where=str(source)[:80])

    def _add_textual_inversion(self, data: Any, token: str | None, tokenizer, text_encoder, *, where: str) -> None:
        explicit = tokenizer is not None or text_encoder is not None
        has_second = getattr(self, "text_encoder_2", None) is not None and not explicit
        name, by_encoder = embeddings_by_encoder(data, token, has_second=has_second)
        targets = {}
        for key, embedding in by_encoder.items():  # widths first: a wrong model is the problem to report
            tokenizer_name, encoder_name = SDXL_KEYS[key]
            target_tokenizer = tokenizer if explicit else getattr(self, tokenizer_name, None)
            target_encoder = text_encoder if explicit else getattr(self, encoder_name, None)
            if target_tokenizer is None or target_encoder is None:
                raise ValueError(f"{type(self).__name__} has no {tokenizer_name} / {encoder_name} to add an "
                                 f"embedding to")
            check_width(embedding, target_encoder, encoder_name="the given text encoder" if explicit else
                        f"{type(self).__name__}.{encoder_name}", where=where)
            targets[key] = (target_tokenizer, target_encoder)
        if not name:
            raise ValueError(f"{where}: the file names no token; pass `token=...`")
        for key, embedding in by_encoder.items():
            add_embedding(*targets[key], name, embedding)

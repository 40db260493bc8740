"""Prompts -> text-encoder embeddings for every pipeline, each text encoder described by data.

A `TextEncoderSpec` says how a pipeline reads one of its text encoders: which tokenizer and encoder, which hidden
layer (and how clip_skip moves it), through the final layer norm or not, where a pooled embedding comes from, and
whether a missing negative prompt is zeros. `encode_prompt_batch` encodes a batch of prompts (and, with guidance,
negative prompts) with a list of them:

- SD 1.x / 2.x, `SD_TEXT_ENCODER`: the last layer through the final norm (clip_skip=k: k layers earlier);
- SDXL, `SDXL_TEXT_ENCODERS`: both encoders' penultimate layers, before the final norm, concatenated on the
  feature axis, and the second encoder's projected pooled embedding (Podell et al. 2023, "SDXL", Sec. 2.1); the
  refiner has the second encoder only;
- the x2 latent upscaler, `LATENT_UPSCALER_TEXT_ENCODER`: the last layer before the final norm, and the pooled
  (end-of-text) output.

Textual-inversion tokens are expanded on the way in; `weighted=True` reads AUTOMATIC1111's `(word:1.3)` syntax and
encodes long prompts in 77-token chunks (prompt_weighting.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from stablepipe.loading.textual_inversion import expand_prompt
from stablepipe.pipelines import prompt_weighting
from stablepipe.pipelines.stages import Prompt, check_negative_prompt, prompt_batch_size, repeat_per_image

logger = logging.getLogger("stablepipe")


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """How a pipeline reads one text encoder."""

    tokenizer: str = "tokenizer"  # the pipeline attributes holding the tokenizer and the text encoder
    text_encoder: str = "text_encoder"
    layer: int = -1  # hidden_states[layer] is read; clip_skip=k reads hidden_states[layer - k]
    final_norm: bool = True  # through the encoder's final layer norm (SD 1/2); SDXL and the x2 upscaler read before
    pooled: str | None = None  # the output field of the pooled embedding ("text_embeds", "pooler_output"), if any
    zeros_for_empty_negative: bool = False  # no negative prompt: zero embeddings (SDXL's force_zeros_for_empty_prompt)
    attention_mask: bool = False  # pass the tokens' mask where the encoder's config sets use_attention_mask
    clip_skip_weighted_negatives: bool = False  # weighted prompts: clip_skip moves the negatives' layer too (A1111)


SD_TEXT_ENCODER = TextEncoderSpec(attention_mask=True, clip_skip_weighted_negatives=True)
SDXL_TEXT_ENCODERS = (
    TextEncoderSpec(layer=-2, final_norm=False, zeros_for_empty_negative=True),
    TextEncoderSpec("tokenizer_2", "text_encoder_2", layer=-2, final_norm=False, pooled="text_embeds",
                    zeros_for_empty_negative=True),
)  # fmt: skip
LATENT_UPSCALER_TEXT_ENCODER = TextEncoderSpec(final_norm=False, pooled="pooler_output")


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A spec with the tokenizer and text encoder it names; either is None where the pipeline has not got it."""

    spec: TextEncoderSpec
    tokenizer: Any
    model: Any

    @property
    def loaded(self) -> bool:
        return self.tokenizer is not None and self.model is not None


def bind_text_encoders(pipe, specs: Sequence[TextEncoderSpec]) -> list[TextEncoder]:
    """Each spec with the pipeline's tokenizer and text encoder of those names (None where absent)."""
    return [TextEncoder(s, getattr(pipe, s.tokenizer, None), getattr(pipe, s.text_encoder, None)) for s in specs]


@dataclasses.dataclass
class PromptEmbeds:
    """The prompt tensors of a call; the negative ones are None without guidance, the pooled ones without a pooled
    encoder."""

    prompt_embeds: torch.Tensor | None = None  # (B, L, D), D summed over the encoders
    negative_prompt_embeds: torch.Tensor | None = None  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # (B, P)

    def as_tuple(self) -> tuple:
        return (self.prompt_embeds, self.negative_prompt_embeds, self.pooled_prompt_embeds,
                self.negative_pooled_prompt_embeds)  # fmt: skip

    def prepared(self, *, device: torch.device, dtype: torch.dtype, num_images_per_prompt: int) -> PromptEmbeds:
        """On `device` in `dtype`, each prompt's copies next to each other: (B * n, ...)."""
        def fit(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else repeat_per_image(x.to(device=device, dtype=dtype), num_images_per_prompt)

        return PromptEmbeds(*(fit(x) for x in self.as_tuple()))


# ---- one encoder --------------------------------------------------------------------------------------------


def tokenize(tokenizer, prompts: list[str], *, max_length: int | None = None):
    """Token ids (and mask) padded to the tokenizer's length (77 for CLIP), textual-inversion tokens expanded,
    warning about what gets cut off."""
    prompts = [expand_prompt(tokenizer, p) for p in prompts]  # multi-vector textual-inversion tokens
    max_length = max_length or tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > tokens.input_ids.shape[-1]:
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        logger.warning("CLIP takes at most %d tokens; this part of the prompt was cut off: %s", max_length, removed)
    return tokens


def run_text_encoder(
    encoder: TextEncoder, ids: torch.Tensor, *, device: torch.device, clip_skip: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Token ids (B, L) -> the hidden states the spec reads (B, L, D) and its pooled embedding (B, P) or None."""
    spec, model = encoder.spec, encoder.model
    layer = spec.layer - (clip_skip or 0)
    own_output = spec.final_norm and layer == -1  # the encoder's last_hidden_state: last layer, final norm
    mask = None if attention_mask is None else attention_mask.to(device)
    out = model(ids.to(device), attention_mask=mask, output_hidden_states=not own_output)
    if own_output:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[layer]
        if spec.final_norm:
            hidden = getattr(model, "text_model", model).final_layer_norm(hidden)  # transformers 4 / 5 layouts
    if spec.pooled is None:
        return hidden, None
    pooled = getattr(out, spec.pooled, None)
    if pooled is None:
        raise ValueError(
            f"{spec.text_encoder} ({type(model).__name__}) gives no `{spec.pooled}`, the pooled embedding this "
            "pipeline is conditioned on; load the text encoder the checkpoint was made with"
        )
    return hidden, pooled


def encode_texts(
    encoder: TextEncoder, texts: list[str], *, device: torch.device, clip_skip: int | None = None,
    chunks: int | None = None, max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One encoder's (hidden states (B, L, D), pooled (B, P) or None) for `texts`, padded to `max_length` tokens.
    With `chunks`, in AUTOMATIC1111's syntax, at least that many 77-token chunks: L = 77 * chunks, the pooled
    embedding the first chunk's."""
    if chunks is not None:
        def run(ids: torch.Tensor):
            return run_text_encoder(encoder, ids, device=device, clip_skip=clip_skip)

        return prompt_weighting.encode_weighted(encoder.tokenizer, run, texts, device=device, min_chunks=chunks)
    tokens = tokenize(encoder.tokenizer, texts, max_length=max_length)
    masked = encoder.spec.attention_mask and getattr(encoder.model.config, "use_attention_mask", False)
    return run_text_encoder(encoder, tokens.input_ids, device=device, clip_skip=clip_skip,
                            attention_mask=tokens.attention_mask if masked else None)  # fmt: skip


def encode_with_all(
    encoders: Sequence[TextEncoder], texts: Sequence[list[str]], *, device: torch.device, clip_skip: int | None,
    chunks: int | None, max_length: int | None = None, negative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Each encoder reads its list of texts; hidden states concatenated on the feature axis (B, L, D1 + D2), the
    pooled embedding the first one an encoder gives. Negatives are read without clip_skip, as diffusers reads
    them, but for a spec that skips weighted negatives too (AUTOMATIC1111)."""
    states, pooled = [], None
    for encoder, own_texts in zip(encoders, texts):
        skip = clip_skip
        if negative and not (chunks is not None and encoder.spec.clip_skip_weighted_negatives):
            skip = None
        hidden, own_pooled = encode_texts(encoder, own_texts, device=device, clip_skip=skip, chunks=chunks,
                                          max_length=max_length)  # fmt: skip
        states.append(hidden)
        pooled = own_pooled if pooled is None else pooled
    return torch.cat(states, dim=-1), pooled


# ---- a batch of prompts -------------------------------------------------------------------------------------


def as_prompt_list(prompt: Prompt, batch_size: int, *, name: str) -> list[str]:
    """A string for every prompt, or one per prompt, as a list of `batch_size` strings."""
    if isinstance(prompt, str):
        return [prompt] * batch_size
    if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"`{name}` must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) != batch_size:
        raise ValueError(
            f"got {len(prompt)} entries in `{name}` for {batch_size} prompts; give one per prompt or a single string"
        )
    return prompt


def check_prompt_batch(
    prompts: tuple[Prompt, Prompt], negatives: tuple[Prompt, Prompt], given: PromptEmbeds, *,
    pooled_encoder: str | None,
) -> int:  # fmt: skip
    """Check (prompt, prompt_2) and (negative_prompt, negative_prompt_2) against the embeddings given; return the
    batch size. `pooled_encoder` names the encoder of the pooled embedding the pipeline needs (None: none)."""
    (prompt, prompt_2), (negative_prompt, negative_prompt_2) = prompts, negatives
    batch_size = prompt_batch_size(prompt, given.prompt_embeds)
    check_negative_prompt(prompt, negative_prompt, batch_size, given.negative_prompt_embeds)
    if prompt_2 is not None and given.prompt_embeds is not None:
        raise ValueError("pass either `prompt_2` or `prompt_embeds`, not both")
    if negative_prompt_2 is not None and given.negative_prompt_embeds is not None:
        raise ValueError("pass either `negative_prompt_2` or `negative_prompt_embeds`, not both")
    for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
        if value is not None:
            as_prompt_list(value, batch_size, name=name)
    if pooled_encoder is None:
        return batch_size
    for prefix, embeds, pooled in (("", given.prompt_embeds, given.pooled_prompt_embeds),
                                   ("negative_", given.negative_prompt_embeds, given.negative_pooled_prompt_embeds)):
        if embeds is not None and pooled is None:
            raise ValueError(
                f"with `{prefix}prompt_embeds` pass `{prefix}pooled_prompt_embeds` too (the pooled embedding of the "
                f"same prompts, from {pooled_encoder}): this pipeline is conditioned on both"
            )
    return batch_size


def weighted_chunk_count(
    encoders: Sequence[TextEncoder], texts: Sequence[list[str]] | None, negatives: Sequence[list[str]] | None,
    prompt_embeds: torch.Tensor | None,
) -> int:  # fmt: skip
    """How many 77-token chunks every prompt and negative prompt is encoded in, so that their embeddings line up:
    the most any of them needs with any encoder, or as many as the given `prompt_embeds` hold."""
    if prompt_embeds is not None:
        return prompt_weighting.chunks_in(prompt_embeds, encoders[0].tokenizer)
    lists = [[*texts[i], *(negatives[i] if negatives else [])] for i in range(min(len(encoders), len(texts)))]
    return max(prompt_weighting.chunk_count(e.tokenizer, prompts) for e, prompts in zip(encoders, lists))


def encode_prompt_batch(
    encoders: Sequence[TextEncoder],
    prompt: Prompt,
    negative_prompt: Prompt = None,
    *,
    prompt_2: Prompt = None,
    negative_prompt_2: Prompt = None,
    given: PromptEmbeds | None = None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    num_images_per_prompt: int = 1,
    guided: bool = True,
    clip_skip: int | None = None,
    weighted: bool = False,
) -> PromptEmbeds:
    """The embeddings of a batch of prompts, (B * n, L, D), and with guidance of its negative prompts.

    `encoders` are the pipeline's (`bind_text_encoders`); the loaded ones read, in order, `prompt` and `prompt_2`
    (default: `prompt`) (so SDXL's refiner, with the second encoder only, reads `prompt`, as in diffusers), and the
    negatives alike. `given` holds embeddings passed in, used as they are. A missing negative prompt is zeros where
    every spec says so, else "". `dtype` defaults to the first encoder's (or the given embeddings'); `weighted`
    reads AUTOMATIC1111's syntax, every prompt and negative in as many 77-token chunks as the longest needs."""
    given = given or PromptEmbeds()
    pooled_encoder = next((e.spec.text_encoder for e in encoders if e.spec.pooled), None)
    batch_size = check_prompt_batch((prompt, prompt_2), (negative_prompt, negative_prompt_2), given,
                                    pooled_encoder=pooled_encoder)  # fmt: skip
    loaded = [e for e in encoders if e.loaded]
    texts = None if given.prompt_embeds is not None else texts_per_encoder(prompt, prompt_2, batch_size)
    zeros = negative_prompt is None and all(e.spec.zeros_for_empty_negative for e in encoders)
    negatives = None  # the negative prompts to encode: none when given, zeros or unguided
    if guided and given.negative_prompt_embeds is None and not zeros:
        negatives = texts_per_encoder(negative_prompt or "", negative_prompt_2, batch_size, prefix="negative_")
    if not loaded and (texts is not None or negatives is not None):
        raise ValueError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds) instead")
    chunks = weighted_chunk_count(loaded, texts, negatives, given.prompt_embeds) if weighted and loaded else None
    embeds = dataclasses.replace(given)
    if texts is not None:
        embeds.prompt_embeds, pooled = encode_with_all(loaded, texts, device=device, clip_skip=clip_skip, chunks=chunks)
        embeds.pooled_prompt_embeds = pooled if given.pooled_prompt_embeds is None else given.pooled_prompt_embeds
    if not guided:
        embeds.negative_prompt_embeds = embeds.negative_pooled_prompt_embeds = None
    elif given.negative_prompt_embeds is None:
        fill_negatives(embeds, loaded, negatives, device=device, clip_skip=clip_skip, chunks=chunks)
    check_same_shape(embeds)
    dtype = dtype or (loaded[0].model.dtype if loaded else embeds.prompt_embeds.dtype)
    return embeds.prepared(device=device, dtype=dtype, num_images_per_prompt=num_images_per_prompt)


def texts_per_encoder(first: Prompt, second: Prompt, batch_size: int, *, prefix: str = "") -> list[list[str]]:
    """The prompts for the first and the second encoder (`second` defaults to `first`), `batch_size` each."""
    return [as_prompt_list(first, batch_size, name=f"{prefix}prompt"),
            as_prompt_list(second or first, batch_size, name=f"{prefix}prompt_2")]  # fmt: skip


def fill_negatives(
    embeds: PromptEmbeds, encoders: Sequence[TextEncoder], negatives: Sequence[list[str]] | None, *,
    device: torch.device, clip_skip: int | None, chunks: int | None,
) -> None:  # fmt: skip
    """Fill in `embeds`' negative tensors: zeros where `negatives` is None, else the negative prompts encoded like
    the prompts (in `chunks` weighted chunks, or padded to the prompt embeddings' length)."""
    if negatives is None:
        embeds.negative_prompt_embeds = torch.zeros_like(embeds.prompt_embeds)
        if embeds.pooled_prompt_embeds is not None:
            embeds.negative_pooled_prompt_embeds = torch.zeros_like(embeds.pooled_prompt_embeds)
        return
    hidden, pooled = encode_with_all(encoders, negatives, device=device, clip_skip=clip_skip, chunks=chunks,
                                     max_length=embeds.prompt_embeds.shape[1], negative=True)  # fmt: skip
    embeds.negative_prompt_embeds = hidden
    if embeds.negative_pooled_prompt_embeds is None:
        embeds.negative_pooled_prompt_embeds = pooled


def check_same_shape(embeds: PromptEmbeds) -> None:
    negative, positive = embeds.negative_prompt_embeds, embeds.prompt_embeds
    if negative is not None and negative.shape != positive.shape:
        raise ValueError(
            f"negative_prompt_embeds {tuple(negative.shape)} and prompt_embeds {tuple(positive.shape)} must have the "
            "same shape"
        )

"""AUTOMATIC1111's prompt syntax: attention weights and prompts longer than CLIP's 77 tokens.

Syntax: `(words)` weighs words 1.1x, `[words]` 1/1.1x, `(words:1.3)` 1.3x, nesting multiplies, `\\(` and
`\\)` (and `\\[`, `\\]`) are literal brackets, and `BREAK` ends the current 75-token chunk. A prompt is
tokenized into chunks of 75 tokens (each wrapped as BOS + 75 + EOS, the rest padded); a chunk that fills
up breaks after its last comma when that comma is at most 20 tokens back, as AUTOMATIC1111 does. Each
chunk is encoded on its own and the chunks are concatenated: (B, 77 * chunks, D). (77 is CLIP's length; a
tokenizer with another `model_max_length` L gets chunks of L - 2 tokens, L in all.)

Weights are applied to the encoder's output and the mean restored (AUTOMATIC1111's "Original" emphasis):
z' = z * w, then z' * mean(z) / mean(z'). The mean is taken per prompt and chunk (AUTOMATIC1111 takes it
over its whole batch; for one prompt it is the same).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

COMMA_BACKTRACK = 20  # a full chunk breaks after its last comma if that is at most this many tokens back
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = object()  # marks a BREAK in a parsed prompt

TOKENS = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def chunk_size(tokenizer) -> int:
    """Tokens per chunk between BOS and EOS: 75 for CLIP's tokenizers, `model_max_length - 2` in general."""
    return tokenizer.model_max_length - 2


def parse_prompt_attention(text: str) -> list[tuple[str | object, float]]:
    """[(text, weight)] for a prompt in AUTOMATIC1111's syntax; `(BREAK, -1.0)` where BREAK stood."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escaped bracket or backslash is literal text
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i > 0:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in open_round:  # unclosed brackets weigh everything after them
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    return merge_equal_weights(pieces)


def merge_equal_weights(pieces: list[list]) -> list[tuple[str | object, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        if text == "":
            continue
        if merged and merged[-1][0] is not BREAK and text is not BREAK and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def chunk_tokens(tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """The prompt as chunks of the tokenizer's length (77 for CLIP: BOS, 75, EOS, padding), with a weight per
    token."""
    from stablepipe.loading.textual_inversion import expand_prompt

    comma, size = tokenizer.convert_tokens_to_ids(",</w>"), chunk_size(tokenizer)
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(wrap_chunk(tokenizer, tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if text is BREAK:
            close_chunk()
            continue
        for token in tokenizer(expand_prompt(tokenizer, text), add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved, moved_weights = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                close_chunk()
                tokens, weights = moved, moved_weights
            if len(tokens) == size:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close_chunk()
    return chunks


def wrap_chunk(tokenizer, tokens: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS, padded to the tokenizer's length (77 for CLIP) with its pad token (EOS for SD 1.x, "!"
    for SD 2.x)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padding = chunk_size(tokenizer) - len(tokens)
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [pad] * padding
    return ids, [1.0, *weights, 1.0] + [1.0] * padding


def empty_chunk(tokenizer) -> tuple[list[int], list[float]]:
    return wrap_chunk(tokenizer, [], [])


def weigh_chunk(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One chunk's hidden states (B, 77, D) times their tokens' weights (B, 77), the mean restored: z' = z * w,
    then z' * mean(z) / mean(z') per prompt (AUTOMATIC1111's "Original" emphasis)."""
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    weighted = hidden * weights[..., None].to(hidden.dtype)  # (B, 77, D)
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    scale = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)  # no 0 / 0
    return weighted * scale


def encode_weighted(
    tokenizer, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]], prompts: list[str], *,
    device: torch.device, min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Weighted, chunked embeddings (B, 77 * chunks, D) of `prompts`, and the first chunk's pooled embedding (what
    SDXL and the x2 upscaler take). `encode(ids)` runs the text encoder on one chunk per prompt, ids (B, 77) ->
    (hidden states (B, 77, D), pooled or None). Every prompt gets the same number of chunks (at least
    `min_chunks`): shorter ones are padded with empty chunks, as AUTOMATIC1111 pads a batch."""
    per_prompt = [chunk_tokens(tokenizer, p) for p in prompts]
    count = max(min_chunks, *(len(c) for c in per_prompt))
    per_prompt = [c + [empty_chunk(tokenizer)] * (count - len(c)) for c in per_prompt]
    hidden, pooled = [], None
    for i in range(count):
        ids = torch.tensor([c[i][0] for c in per_prompt], device=device)  # (B, 77)
        weights = torch.tensor([c[i][1] for c in per_prompt], device=device)  # (B, 77)
        z, chunk_pooled = encode(ids)
        hidden.append(weigh_chunk(z, weights))
        pooled = chunk_pooled if pooled is None else pooled
    return torch.cat(hidden, dim=1), pooled  # (B, 77 * count, D)


def chunk_count(tokenizer, prompts: list[str]) -> int:
    return max(len(chunk_tokens(tokenizer, p)) for p in prompts)


def chunks_in(embeds: torch.Tensor, tokenizer) -> int:
    """How many chunks (77 tokens for CLIP) given embeddings (B, L, D) hold, so that negatives can be encoded to
    match."""
    return max(1, embeds.shape[1] // tokenizer.model_max_length)

"""CLIP's tokenizer for single-file checkpoints, built from the vocabulary shipped with the package.

A `.safetensors` from a model site holds no tokenizer; every Stable Diffusion family model uses CLIP's byte-pair
encoding (SD 1.x and SDXL's first encoder pad with <|endoftext|>, the OpenCLIP encoders of SD 2.x and SDXL's second
with "!"). The merges ship as `data/clip_bpe_merges.txt.gz` (OpenAI CLIP's, MIT licensed), and the vocab.json /
merges.txt pair transformers reads is derived from them as CLIP derives its vocabulary: the 256 byte symbols, the
same with the end-of-word mark </w>, one token per merge in order, then <|startoftext|> and <|endoftext|>
(49 408 tokens). Written once to the stablepipe cache; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from stablepipe.cache import FINISHED_MARK, cached_build

MERGES_FILE = Path(__file__).parent / "data" / "clip_bpe_merges.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # CLIP's vocabulary size without the byte symbols and the two special tokens
START, END = "<|startoftext|>", "<|endoftext|>"
PAD_TOKENS = (END, "!")  # SD 1.x / SDXL's first encoder, and the OpenCLIP encoders


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def write_vocabulary(folder: str | os.PathLike) -> Path:
    """vocab.json and merges.txt of CLIP's tokenizer in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(MERGES_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + MERGE_COUNT]  # the first line is a header
    alphabet = byte_level_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in merges), START, END]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / FINISHED_MARK).write_text("{}")  # the cache's "finished" mark (see cache.cached_build)
    return folder


def clip_tokenizer(pad_token: str = END, model_max_length: int = 77):
    """CLIP's tokenizer as Stable Diffusion checkpoints use it: lower-cased, 77 tokens, `pad_token` as given."""
    from transformers import CLIPTokenizer

    if pad_token not in PAD_TOKENS:
        raise ValueError(f"pad_token must be one of {PAD_TOKENS}, got {pad_token!r}")
    folder = cached_build("clip-vocabulary", write_vocabulary)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=model_max_length
    )

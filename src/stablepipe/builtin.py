"""The built-in tiny model: a full SD 1.x-shaped pipeline that works offline, for demos and tests.

Its weights are random for now (the picture is noise); it exists so that every command runs on a fresh
machine with no downloads. It is built deterministically from a seed and saved in diffusers' layout, so
it exercises the same loading code as a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

BUILTIN_NAME = "builtin-tiny-v2"


def cache_dir() -> Path:
    base = os.environ.get("STABLEPIPE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "stablepipe")
    return Path(base)


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


TINY_MERGES = ["a n", "i n", "r e", "o n", "t h", "e r", "th e</w>", "re d</w>", "o n</w>", "a n</w>"]


def write_tiny_tokenizer(folder: str | os.PathLike, *, max_length: int = 77):
    """A CLIP tokenizer with a byte-level vocabulary and a few merges (about 530 tokens); returns it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
    sample_size=128,
)
TINY_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)


def build_builtin_pipeline(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build the tiny random pipeline from `seed` and save it to `folder` in diffusers' layout."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline
    from stablepipe.schedulers import PNDMScheduler

    folder = Path(folder)
    tokenizer = write_tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(text_config).eval(), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**TINY_UNET), scheduler=PNDMScheduler(**TINY_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.save_pretrained(folder)


def builtin_model_path() -> Path:
    """The built-in model's folder, built on first use in the stablepipe cache."""
    folder = cache_dir() / BUILTIN_NAME
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_builtin_pipeline(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return folder

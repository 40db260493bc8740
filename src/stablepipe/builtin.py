"""The built-in models, so that every command runs on a fresh machine with no downloads.

- The demo model (`demo_model/` in the package, float16 weights, a few MB), where the package ships one: trained
  by `training/train_demo.py` on 32 x 32 pictures of one flat shape on a flat background, captioned like
  "a small red circle on a gray background, top left". `builtin_model_path()` (what `stablepipe generate` and
  `stablepipe ui` use when no model is given) returns it, unpacked to float32 in the cache.
- The tiny random model (`random_model_path()`, and `builtin_model_path()` where no demo model is shipped): built
  deterministically from a seed, SD 1.x-shaped with random weights (the picture is noise), for tests that need
  a model of that shape.
Both are in diffusers' layout, so they exercise the same loading code as a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

BUILTIN_NAME = "builtin-tiny-v2"  # the tiny random model's folder in the cache
DEMO_NAME = "builtin-demo-shapes-v1"  # the demo model's unpacked folder in the cache: bump when retrained
DEMO_MODEL = Path(__file__).parent / "demo_model"
DEMO_PROMPT = "a large red circle on a gray background, top left"  # a caption the demo model was trained on


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    base = os.environ.get("STABLEPIPE_CACHE") or Path(xdg, "stablepipe")
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


def random_model_path() -> Path:
    """The tiny random model's folder, built on first use in the stablepipe cache."""
    return cached_build(BUILTIN_NAME, build_builtin_pipeline)


def demo_model_shipped() -> bool:
    return (DEMO_MODEL / "model_index.json").is_file()


def builtin_model_path() -> Path:
    """The model to use when none is given: the trained demo model, or the tiny random one where the package was
    installed without the demo weights."""
    if not demo_model_shipped():
        return random_model_path()
    return cached_build(DEMO_NAME, unpack_demo_model)


def builtin_model_note() -> str:
    """What the command line and the web app say when they fall back to the built-in model."""
    if demo_model_shipped():
        return f'the built-in demo model (32 x 32 pictures of one shape on a plain background, e.g. "{DEMO_PROMPT}")'
    return "the built-in tiny model (random weights, the picture is noise)"


def unpack_demo_model(folder: str | os.PathLike) -> Path:
    """Copy the shipped demo model to `folder` with its float16 weights stored as float32, so it loads in float32
    (the default everywhere) with no dtype argument."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(DEMO_MODEL, folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path in Path(folder).glob("*/*.safetensors"):
        save_file({k: v.float() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return Path(folder)


def cached_build(name: str, build) -> Path:
    """`cache_dir() / name`, made by `build(folder)` on first use (atomically, safe against concurrent builds)."""
    folder = cache_dir() / name
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return folder

"""The built-in models, so that every command runs on a fresh machine with no downloads.

- The demo model (`demo_model/` in the package, float16 weights, a few MB), where the package ships one: trained
  by `training/train_demo.py` on 32 x 32 pictures of one flat shape on a flat background, captioned like
  "a small red circle on a gray background, top left". `builtin_model_path()` (what `stablepipe generate` and
  `stablepipe ui` use when no model is given) returns it, unpacked to float32 in the cache.
- The tiny random model (`random_model_path()`, and `builtin_model_path()` where no demo model is shipped): built
  deterministically from a seed, SD 1.x-shaped with random weights (the picture is noise), for tests that need
  a model of that shape.
- Tiny random models of the other kinds: image variation, the x4 and x2 upscalers, LDM3D and its RGB-D upscaler.
All are in diffusers' layout, so they exercise the same loading code as a real checkpoint. `BUILTIN_MODELS` is the
one table of them (by kind) that the command line, the web app, the HTTP API and batch jobs all use.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from stablepipe.cache import cached_build
from stablepipe.loading.clip_tokenizer import byte_level_alphabet

BUILTIN_NAME = "builtin-tiny-v2"  # the tiny random model's folder in the cache
DEMO_NAME = "builtin-demo-shapes-v1"  # the demo model's unpacked folder in the cache: bump when retrained
DEMO_MODEL = Path(__file__).parent / "demo_model"
DEMO_PROMPT = "a large red circle on a gray background, top left"  # a caption the demo model was trained on


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


# ---- tiny random models of the other kinds ---------------------------------------------------------------------

VARIATION_NAME = "builtin-tiny-variation-v1"
UPSCALER_NAMES = {"x4": "builtin-tiny-x4-upscaler-v1", "x2": "builtin-tiny-x2-latent-upscaler-v1"}
LDM3D_NAMES = {"ldm3d": "builtin-tiny-ldm3d-v1", "sr": "builtin-tiny-ldm3d-sr-v1"}
DDPM_BETAS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear"}  # the upscalers' noise


def tiny_text_pipeline():
    """The tiny random model, loaded (its tokenizer and text encoder of hidden size 64 serve the other kinds)."""
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(random_model_path(), requires_safety_checker=False)


def build_builtin_variation(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """The tiny random model's VAE, UNet and scheduler with a random 32 px CLIP image encoder (random
    weights: the picture is noise), saved in the lambdalabs/sd-image-variations-diffusers layout."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from stablepipe.pipelines.variation import StableDiffusionImageVariationPipeline

    text = tiny_text_pipeline()
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=4, projection_dim=text.unet.config.cross_attention_dim,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImageVariationPipeline(
        vae=text.vae, image_encoder=CLIPVisionModelWithProjection(config).eval(), unet=text.unet,
        scheduler=text.scheduler, feature_extractor=processor, requires_safety_checker=False,
    )
    return pipe.save_pretrained(folder)


def build_builtin_x4(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny x4 upscaler in the stabilityai/stable-diffusion-x4-upscaler layout: 7-channel UNet with 1000 noise-
    level classes, a 3-level VAE (scaling factor 0.08333), DDPM low-res noise and a v-prediction DDIM sampler."""
    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.upscale import StableDiffusionUpscalePipeline
    from stablepipe.schedulers import DDIMScheduler, DDPMScheduler

    text = tiny_text_pipeline()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, num_class_embeds=1000,
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text.text_encoder, tokenizer=text.tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**DDPM_BETAS),
        scheduler=DDIMScheduler(**DDPM_BETAS, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
    )
    return pipe.save_pretrained(folder)


def build_builtin_x2(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny x2 latent upscaler in the stabilityai/sd-x2-latent-upscaler layout: K-block UNet with Fourier time
    features and (noise level, pooled text) conditioning, a 4-level VAE, Euler predicting the clean sample."""
    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.latent_upscale import StableDiffusionLatentUpscalePipeline
    from stablepipe.schedulers import EulerDiscreteScheduler

    text = tiny_text_pipeline()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=8, out_channels=5, act_fn="gelu", norm_num_groups=None, conv_in_kernel=1,
        conv_out_kernel=1, block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=64, time_cond_proj_dim=128 + 64, time_embedding_type="fourier", timestep_post_act="gelu",
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        mid_block_type=None, up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",),
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16)
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=vae, text_encoder=text.text_encoder, tokenizer=text.tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(prediction_type="sample"),
    )
    return pipe.save_pretrained(folder)


def build_builtin_ldm3d(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """The tiny random model with a VAE that decodes RGB + depth (the Intel/ldm3d-4c layout)."""
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.ldm3d import StableDiffusionLDM3DPipeline

    text = tiny_text_pipeline()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_VAE, "in_channels": 4, "out_channels": 4})
    parts = {k: v for k, v in text.components.items() if k != "vae"}
    return StableDiffusionLDM3DPipeline(vae=vae, **parts, requires_safety_checker=False).save_pretrained(folder)


def build_builtin_ldm3d_sr(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny RGB-D upscaler in the Intel/ldm3d-sr layout: the tiny LDM3D VAE and text encoder, a UNet of
    4 latent + 4 image-latent channels with 1000 noise-level classes, DDPM low-res and DDIM schedulers."""
    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.pipelines.ldm3d import StableDiffusionLDM3DPipeline, StableDiffusionUpscaleLDM3DPipeline
    from stablepipe.schedulers import DDIMScheduler, DDPMScheduler

    base = StableDiffusionLDM3DPipeline.from_pretrained(builtin_ldm3d_path(), requires_safety_checker=False)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 8, "num_class_embeds": 1000})
    pipe = StableDiffusionUpscaleLDM3DPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**DDPM_BETAS), scheduler=DDIMScheduler.from_config(base.scheduler.config),
        requires_safety_checker=False,
    )
    return pipe.save_pretrained(folder)


def builtin_variation_path() -> Path:
    return cached_build(VARIATION_NAME, build_builtin_variation)


def builtin_upscaler_path(kind: str) -> Path:
    """The built-in tiny upscaler's folder ("x4" or "x2"), built on first use in the stablepipe cache."""
    if kind not in UPSCALER_NAMES:
        raise ValueError(f"there is no built-in {kind!r} upscaler; the built-in ones are {', '.join(UPSCALER_NAMES)}")
    return cached_build(UPSCALER_NAMES[kind], build_builtin_x4 if kind == "x4" else build_builtin_x2)


def builtin_ldm3d_path() -> Path:
    return cached_build(LDM3D_NAMES["ldm3d"], build_builtin_ldm3d)


def builtin_ldm3d_sr_path() -> Path:
    return cached_build(LDM3D_NAMES["sr"], build_builtin_ldm3d_sr)


# ---- the registry ---------------------------------------------------------------------------------------------

# Every built-in model by kind: a function returning its folder (built in the cache on first use).
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "sd": builtin_model_path,  # the demo model where shipped, else the tiny random one
    "variation": builtin_variation_path,
    "x4": lambda: builtin_upscaler_path("x4"),
    "x2": lambda: builtin_upscaler_path("x2"),
    "ldm3d": builtin_ldm3d_path,
    "ldm3d-sr": builtin_ldm3d_sr_path,
}


def builtin_path(kind: str) -> Path:
    """The folder of the built-in model of `kind` (a key of BUILTIN_MODELS), or a ValueError naming the kinds."""
    if kind not in BUILTIN_MODELS:
        raise ValueError(f"there is no built-in {kind!r} model; the built-in kinds are {', '.join(BUILTIN_MODELS)}")
    return Path(BUILTIN_MODELS[kind]())

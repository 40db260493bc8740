"""What the benchmarks share: full-size architectures with random weights, paired timing, FLOPs, memory, machine state.

Nothing is downloaded: diffusers builds each model from the real architecture's config with random weights, and
stablepipe loads the very same tensors (in-process) or the very same folder (whole-image runs in subprocesses).
Timing is paired: the variants run in turn, round after round, and each round's time is divided by the first
variant's time of the same round, so a load that comes and goes on a shared machine hits both sides of a ratio
alike. With one thread the clock is the thread's CPU time (time spent waiting for a core is not counted).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
CLIP_L_TEXT = dict(  # SD 1.x's text encoder (CLIP ViT-L/14)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the machine ------------------------------------------------------------------------------------------------


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses


def machine() -> str:
    """One line: threads, CPU capability, bfloat16 / AMX support, load average, torch version."""
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} "
        f"(avx512_bf16 {bf16}, amx {amx}), load average {load}, torch {torch.__version__}"
    )


# ---- timing -----------------------------------------------------------------------------------------------------


def clock() -> Callable[[], float]:
    """The thread's CPU time with one thread (robust to other processes), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def paired(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Run every variant once per round (alternating the order); per variant: (best seconds, median over rounds
    of first-variant time / this variant's time), i.e. its speed-up over the first variant."""
    now = clock()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for fn in fns.values():
        fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = now()
            fns[name]()
            times[name].append(now() - start)
    base = times[names[0]]
    return {n: (min(times[n]), statistics.median(b / t for b, t in zip(base, times[n]))) for n in names}


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call, counted by torch's FlopCounterMode (matmuls, convolutions and
    attention; its table lacks the CPU flash-attention kernel, which is counted here as 4 N M d per head)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={cpu_kernel: cpu_flash}) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def matmul_rate(dtype: torch.dtype, *, size: int = 2048, rounds: int = 5) -> float:
    """The measured matrix-multiply rate (FLOP/s, best of `rounds`) of a size^3 product: the machine's peak."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = paired({"mm": lambda: a @ b}, rounds)["mm"][0]
    return 2 * size**3 / best


# ---- memory -----------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the memory figures need Linux)")


# ---- models -----------------------------------------------------------------------------------------------------


def random_unet(config: dict, dtype: torch.dtype, *, seed: int = 0):
    """diffusers' UNet of `config` with random weights made directly in `dtype` (no float32 copy of a large model):
    built on the meta device, materialised, then filled (normal, std 1/sqrt(fan-in); norms at 1 and 0)."""
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config).to(dtype)
    unet = unet.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return unet


CLIP_BIGG_TEXT = dict(  # SDXL's second text encoder (OpenCLIP ViT-bigG/14), with its projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading",
)
TINY = {  # --tiny: the same pipelines at toy size, to try a script in seconds
    "unet": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), sample_size=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "vae": dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=32),
    "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
}  # fmt: skip


def _text_encoder(config: dict, tokenizer, *, tiny: bool, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    text_config = CLIPTextConfig(**{**config, **(TINY["text"] if tiny else {})}, **ids)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config).eval()


def _tiny_unet(kind: str) -> dict:
    extra = {"cross_attention_dim": 32}
    if kind == "sdxl":
        extra = {"cross_attention_dim": 64, "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32}  # fmt: skip
    return {**TINY["unet"], **extra}


def write_folder(folder: Path, kind: str = "sd15", *, tiny: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers folder of the full-size SD 1.5 or SDXL base architecture with random weights (no safety
    checker), saved in `dtype`; made once. The tokenizers are small (the vocabulary size does not change the work)."""
    if (folder / "model_index.json").is_file():
        return folder
    import tempfile

    import diffusers

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = [write_tiny_tokenizer(Path(scratch, str(i))) for i in range(2)]
    torch.manual_seed(0)
    unet_config = _tiny_unet(kind) if tiny else (SDXL_UNET if kind == "sdxl" else SD15_UNET)
    vae_config = {**SD_VAE, **(TINY["vae"] if tiny else {})}
    parts = {"unet": random_unet(unet_config, dtype), "tokenizer": tokenizers[0],
             "text_encoder": _text_encoder(CLIP_L_TEXT, tokenizers[0], tiny=tiny, projection=False).to(dtype)}
    if kind == "sdxl":
        parts.update(vae=diffusers.AutoencoderKL(**vae_config, scaling_factor=0.13025, force_upcast=True).to(dtype),
                     text_encoder_2=_text_encoder(CLIP_BIGG_TEXT, tokenizers[1], tiny=tiny, projection=True).to(dtype),
                     tokenizer_2=tokenizers[1], scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER))
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    else:
        parts.update(vae=diffusers.AutoencoderKL(**vae_config).to(dtype),
                     scheduler=diffusers.PNDMScheduler(**SD15_SCHEDULER))
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)  # fmt: skip
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(staging)
    staging.rename(folder)
    return folder


def write_sd15_folder(folder: Path) -> Path:
    """The full-size SD 1.5 folder in float32 (whole_image.py, components.py)."""
    return write_folder(folder, "sd15")


def emit(record: dict) -> None:
    """One JSON line on stdout (what the parent process of a subprocess benchmark reads)."""
    print("RESULT " + json.dumps(record), flush=True)

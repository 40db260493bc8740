"""One forward of the full-size SD 1.5 (or SDXL) UNet, stablepipe against diffusers: same weights, same run.

    python benchmarks/unet_forward.py --model sd15 --size 512 --batch 2 --dtype float32 bfloat16 --rounds 3
    python benchmarks/unet_forward.py --model sdxl --size 1024 --dtype bfloat16 --variants diffusers stablepipe

Random weights (nothing is downloaded): diffusers' model is built from the architecture's config, and stablepipe
takes the very same tensors. Batch 2 is one guided step. Variants: `diffusers`, `diffusers+cl` (channels-last),
`stablepipe`, `stablepipe+cl`, `stablepipe+cl+fused` (fused QKV projections). Per variant: best seconds of
--rounds paired rounds, GFLOP/s (FLOPs counted by torch's FlopCounterMode, attention included), that rate as a
share of the measured matrix-multiply rate, the speed-up over diffusers (median of per-round ratios), and the
max abs difference of the output from diffusers'. With --threads 1 the clock is the thread's CPU time.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import DTYPES, SD15_UNET, SDXL_UNET, count_flops, machine, paired, random_unet  # noqa: E402

MODELS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
VARIANTS = ("diffusers", "diffusers+cl", "stablepipe", "stablepipe+cl", "stablepipe+cl+fused")


def inputs(model: str, batch: int, size: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Latents, timesteps, text embeddings (and SDXL's pooled embeddings and size ids)."""
    generator = torch.Generator().manual_seed(0)
    side, width = size // 8, 2048 if model == "sdxl" else 768
    x = torch.randn(batch, 4, side, side, generator=generator).to(dtype)
    text = torch.randn(batch, 77, width, generator=generator).to(dtype)
    kwargs = {}
    if model == "sdxl":
        pooled = torch.randn(batch, 1280, generator=generator).to(dtype)
        ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    return (x, torch.tensor([500] * batch), text), kwargs


def build_variants(theirs, names: list[str]) -> dict[str, torch.nn.Module]:
    from stablepipe import UNet2DConditionModel

    ours = UNet2DConditionModel.from_state_dict(dict(theirs.config), theirs.state_dict())  # shares the tensors
    made = {}
    for name in names:
        lib, *options = name.split("+")
        model = theirs if lib == "diffusers" else ours
        if options:
            model = copy.deepcopy(model) if lib == "diffusers" else _fresh(ours)
        if "cl" in options:
            model.to(memory_format=torch.channels_last)
        if "fused" in options:
            model.fuse_qkv_projections()
        made[name] = model
    return made


def _fresh(ours):
    from stablepipe import UNet2DConditionModel

    return UNet2DConditionModel.from_state_dict(dict(ours.config), dict(ours.state_dict()))


def time_embedding_share(unet, args: tuple, kwargs: dict) -> float:
    """The time spent on the timestep / conditioning embeddings, as a share of one forward."""
    start = time.perf_counter()
    for _ in range(20):
        unet.embed(args[0], args[1], added_cond_kwargs=kwargs.get("added_cond_kwargs"))
    embed = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    unet(*args, **kwargs)
    return embed / (time.perf_counter() - start)


def run_dtype(args: argparse.Namespace, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    theirs = random_unet(MODELS[args.model], dtype)
    variants = build_variants(theirs, ["diffusers"] + [v for v in args.variants if v != "diffusers"])
    call_args, kwargs = inputs(args.model, args.batch, args.size, dtype)
    flops = count_flops(lambda: theirs(*call_args, **kwargs))
    peak = common.matmul_rate(dtype)
    with torch.no_grad():
        reference = theirs(*call_args, **kwargs).sample.float()
        diffs = {n: (m(*call_args, **kwargs).sample.float() - reference).abs().max().item()
                 for n, m in variants.items()}
        results = paired({n: (lambda m=m: m(*call_args, **kwargs)) for n, m in variants.items()}, args.rounds)
        share = time_embedding_share(variants["stablepipe"], call_args, kwargs) if "stablepipe" in variants else 0
    print(f"{args.model} {dtype_name} {args.size}px batch {args.batch}: {flops / 1e9:.0f} GFLOP per forward; "
          f"matmul {peak / 1e9:.0f} GFLOP/s; time embedding {share:.2%} of a forward")  # fmt: skip
    for name, (seconds, speedup) in results.items():
        rate = flops / seconds
        print(f"  {name:22s} {seconds:8.3f} s  {rate / 1e9:5.0f} GFLOP/s  {rate / peak:5.1%} of matmul  "
              f"x{speedup:.3f} vs diffusers  max abs diff {diffs[name]:.1e}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    common.set_threads(args.threads)
    print(f"# {machine()}")
    for dtype_name in args.dtype:
        run_dtype(args, dtype_name)

if __name__ == "__main__":
    main()

"""Peak memory of the x4 upscaler, untiled against tiled (UNet tiles + the VAE's tiled decode), same run.

    python benchmarks/upscale_memory.py --sizes 128 192 --tile 64 --overlap 16 --steps 1
    python benchmarks/upscale_memory.py --sizes 512 --tile 128 --device cuda       # on a GPU

The models have the real stabilityai/stable-diffusion-x4-upscaler architecture (UNet 473M parameters, 3-level
VAE; the configs stablepipe ships for single-file loading) with random weights, so nothing is downloaded; the
prompt embeddings are random too (the text encoder is not part of the measurement). Each case runs in a fresh
process, after a warm-up call on a 32 px image (one-time caches such as oneDNN's weight layouts are not counted).
CPU: peak resident memory (VmHWM, reset before the call) above the memory held just before it, with glibc's
mmap threshold fixed so that freed tensors leave resident memory at once; CUDA:
`torch.cuda.max_memory_allocated` above the same baseline. Guidance is on (batch 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this CPU measurement needs Linux)")


def build_pipeline(device: str):
    """The x4 upscaler's UNet, VAE and schedulers from the shipped configs, random weights; no text encoder."""
    from stablepipe import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from stablepipe.loading.model_detection import type_config

    parts = type_config("sd-x4-upscaler")["components"]
    torch.manual_seed(0)
    pipe = StableDiffusionUpscalePipeline(
        vae=AutoencoderKL(**parts["vae"]["config"]).eval(), text_encoder=None, tokenizer=None,
        unet=UNet2DConditionModel(**parts["unet"]["config"]).eval(),
        low_res_scheduler=DDPMScheduler(**parts["low_res_scheduler"]["config"]),
        scheduler=DDIMScheduler(**parts["scheduler"]["config"]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def measure(size: int, tile: int | None, overlap: int | None, steps: int, device: str) -> dict:
    """One upscale of a size x size image; returns the peak memory above the built models, in MiB, and seconds."""
    pipe = build_pipeline(device)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g)
    embeds = torch.randn(2, 1, 77, 1024, generator=g).to(device)
    call = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], generator=g, output_type="pt")
    with torch.no_grad():  # warm-up on a small image: one-time caches (oneDNN weight layouts) are not counted
        pipe(image=image[:, :, :32, :32], num_inference_steps=1, **call)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        baseline = rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(image=image, num_inference_steps=steps, tile_size=tile, tile_overlap=overlap, **call).images
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_kib("VmHWM") * 1024
    return {"size": size, "output": tuple(out.shape[-2:]), "tile": tile, "overlap": overlap,
            "peak_mib": round((peak - baseline) / 2**20), "seconds": round(seconds, 1)}  # fmt: skip


def run_in_child(args: argparse.Namespace, size: int, tile: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", "--sizes", str(size), "--steps", str(args.steps),
               "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
    if tile is not None:
        command += ["--tile", str(tile), "--overlap", str(args.overlap)]
    # a fixed mmap threshold makes glibc return every freed tensor to the system at once, so that resident memory
    # follows the live tensors (with its default, freed heap memory stays resident and is reused unseen)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128], help="low-res input sides in pixels")
    parser.add_argument("--tile", type=int, default=64, help="tile side in low-res pixels (0: untiled only)")
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (memory does not depend on them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        tile = args.tile or None
        print(json.dumps(measure(args.sizes[0], tile, args.overlap if tile else None, args.steps, args.device)))
        return
    print(f"x4 upscaler, real architecture, random weights, {args.device}, guidance on, {args.steps} step(s)")
    print("| input | output | mode | peak above models (MiB) | seconds |\n|---|---|---|---|---|")
    for size in args.sizes:
        for tile in [None] + ([args.tile] if args.tile else []):
            r = run_in_child(args, size, tile)
            mode = "untiled" if tile is None else f"tiles {tile} px, overlap {args.overlap}"
            print(f"| {size}x{size} | {r['output'][1]}x{r['output'][0]} | {mode} | {r['peak_mib']} | {r['seconds']} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

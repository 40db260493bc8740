"""One whole image (text encoding, denoising, VAE decode), stablepipe against diffusers: time and peak memory.

    python benchmarks/whole_image.py --size 512 --steps 20 --dtype float32 bfloat16 --rounds 2 --threads 2
    python benchmarks/whole_image.py --model sdxl --size 1024 --steps 20 --dtype bfloat16 --rounds 1

The full-size SD 1.5 (or SDXL base) architecture with random weights is written once as a diffusers folder
(SD 1.5 in float32, 4.3 GB; SDXL in bfloat16, 6.9 GB: float32 SDXL does not fit this machine's memory twice),
and each library loads that same folder. Every run is a fresh subprocess, so each figure is one library alone:
`load` is from_pretrained, `image` one call of the pipeline (seed 0, guidance 7.5, SDXL 5.0; the folder's
scheduler, PNDM or Euler; no safety checker), `peak RSS` the process's high-water mark (VmHWM) over loading and
the image together. Rounds alternate the libraries; the best time of each is kept and the ratio is taken per
round. The images of the two libraries are compared (max abs difference on [0, 1]). Variants of stablepipe
(--ours) add options: `channels_last` (models in channels-last memory format), `fused` (fused QKV projections),
`step_cacheN` (step caching, the whole UNet every N-th step); `PSNR` is against diffusers' picture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import DTYPES, emit, machine, peak_rss_mib, set_threads  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def run_worker(args: argparse.Namespace) -> None:
    """In the subprocess: load one library's pipeline, make one image, report."""
    import numpy as np
    import torch

    set_threads(args.threads)
    dtype_name = args.dtype[0]
    dtype = DTYPES[dtype_name]
    start = time.perf_counter()
    module = __import__("diffusers" if args.lib == "diffusers" else "stablepipe")
    if args.model == "sdxl":
        pipe = module.StableDiffusionXLPipeline.from_pretrained(args.folder, torch_dtype=dtype)
    else:
        pipe = module.StableDiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype, safety_checker=None,
                                                              requires_safety_checker=False)  # fmt: skip
    for option in args.options:
        if option == "channels_last":
            pipe.enable_channels_last()
        elif option == "fused":
            pipe.fuse_qkv_projections()
        elif option.startswith("step_cache"):  # step_cacheN: whole UNet every N-th step
            pipe.enable_step_cache(interval=int(option.removeprefix("step_cache")))
    pipe.set_progress_bar_config(disable=True)
    load_s, rss_loaded = time.perf_counter() - start, peak_rss_mib()
    now = common.clock()  # with --threads 1 the image is timed in the thread's CPU time (robust to other load)
    start = now()
    image = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                 guidance_scale=5.0 if args.model == "sdxl" else 7.5, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]  # fmt: skip
    image_s = now() - start
    np.save(args.save, np.asarray(image, dtype=np.float32))
    emit({"lib": args.lib, "options": args.options, "dtype": dtype_name, "load_s": load_s, "image_s": image_s,
          "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": rss_loaded})  # fmt: skip


def run_case(args: argparse.Namespace, lib: str, options: list[str], dtype: str, save: Path) -> dict:
    command = [sys.executable, __file__, "--worker", "--lib", lib, "--dtype", dtype, "--folder", str(args.folder),
               "--model", args.model,
               "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
               "--save", str(save), "--options", *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{lib} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def compare(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    folder_dtype = torch.bfloat16 if args.model == "sdxl" else torch.float32
    common.write_folder(args.folder, args.model, dtype=folder_dtype)
    variants = [("diffusers", [])] + [("stablepipe", [o for o in spec.split("+") if o]) for spec in args.ours]
    names = ["diffusers"] + ["stablepipe" + ("+" + spec if spec else "") for spec in args.ours]
    print(f"# {machine()}\n# {args.model} {args.size}x{args.size}, {args.steps} steps, batch 1")
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.dtype:
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for r in range(args.rounds):
                order = list(zip(names, variants))
                for name, (lib, options) in order if r % 2 == 0 else order[::-1]:
                    runs[name].append(run_case(args, lib, options, dtype, Path(scratch, f"{name}-{dtype}.npy")))
            reference = np.load(Path(scratch, f"diffusers-{dtype}.npy"))
            for name in names:
                best = min(runs[name], key=lambda x: x["image_s"])
                ratio = statistics.median(d["image_s"] / o["image_s"] for d, o in zip(runs["diffusers"], runs[name]))
                rss = max(x["peak_rss_mib"] for x in runs[name]) / max(x["peak_rss_mib"] for x in runs["diffusers"])
                image = np.load(Path(scratch, f"{name}-{dtype}.npy")).astype(np.float64)
                diff = float(np.abs(image - reference).max())
                psnr = 10 * np.log10(1 / max(float(np.mean((image - reference) ** 2)), 1e-20))
                print(f"{dtype:9s} {name:28s} image {best['image_s']:7.1f} s (x{ratio:.2f} vs diffusers) | "
                      f"load {best['load_s']:5.1f} s | peak RSS {best['peak_rss_mib']:7.0f} MiB (x{rss:.2f}) | "
                      f"after load {best['rss_after_load_mib']:7.0f} MiB | max abs diff {diff:.1e} | "
                      f"PSNR {psnr:5.1f} dB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=2, help="runs of each library (best time kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None, help="default: stablepipe-bench-<model> in the temp dir")
    parser.add_argument("--ours", nargs="*", default=[""],
                        help='stablepipe variants: "" (plain), "channels_last", "channels_last+fused" ...')
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--options", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.folder = args.folder or Path(tempfile.gettempdir()) / f"stablepipe-bench-{args.model}"
    if args.worker:
        run_worker(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()

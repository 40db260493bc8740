"""`stablepipe batch` against a plain loop of `stablepipe generate` calls: the same requests, images per second.

    python benchmarks/batch_throughput.py                        # the demo model, 16 images, 20 steps
    python benchmarks/batch_throughput.py --images 32 --batch-size 8 --threads 2
    python benchmarks/batch_throughput.py --in-process-only         # batching alone, no command-line runs

Three ways to draw the same N pictures (one distinct prompt and seed each):
  loop of generate  N `stablepipe generate` processes, one after another (what a shell loop does)
  batch             one `stablepipe batch` process over a JSONL file (model loaded once, --batch-size per UNet call)
  in-process        one loaded pipeline, one image per call, then --batch-size per call (`run_batch`): the share of
                    the gain that batching alone gives, without process start-up and model loading
Every picture of `batch` is checked against the one `generate` wrote (max pixel difference printed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, set_threads  # noqa: E402

COLOURS, SHAPES, BACKGROUNDS = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("black", "white")


def prompts(count: int) -> list[str]:
    """Distinct captions in the demo model's language."""
    captions = itertools.cycle(itertools.product(("small", "large"), COLOURS, SHAPES, BACKGROUNDS))
    return [f"a {s} {c} {shape} on a {b} background, top left" for (s, c, shape, b), _ in zip(captions, range(count))]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_generate_loop(texts: list[str], flags: list[str], out: Path) -> float:
    exe = shutil.which("stablepipe")
    return sum(timed([exe, "generate", text, "--seed", str(seed), "--out", str(out / f"{seed:05d}.png"), *flags])
               for seed, text in enumerate(texts))


def run_batch_command(texts: list[str], flags: list[str], out: Path, batch_size: int) -> float:
    jobs = out / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": t, "seed": s}) + "\n" for s, t in enumerate(texts)))
    return timed([shutil.which("stablepipe"), "batch", str(jobs), "--out", str(out / "images"),
                  "--batch-size", str(batch_size), *flags])


def run_in_process(texts: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """Seconds for the N images one per call, then `batch_size` per call, on one loaded pipeline."""
    from stablepipe.batching import ImageRequest, group_requests, run_batch
    from stablepipe.model_flags import load_pipeline_from_flags
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    flags = argparse.Namespace(model=args.model, variant=None, revision=None, device="cpu", dtype=args.dtype,
                               no_safety_checker=True, config=None, lora=[], embedding=[], prompt_weighting=False,
                               scheduler=None, quiet=True, json=False, clip_skip=None)
    pipe = load_pipeline_from_flags(StableDiffusionPipeline, flags, lambda message: None)
    height, width = pipe.default_size(None, None)
    requests = [ImageRequest("txt2img", t, seed=s, width=width, height=height, steps=args.steps, guidance=7.5)
                for s, t in enumerate(texts)]
    run_batch(lambda task: pipe, requests[:1])  # warm-up
    alone = together = 0.0
    for i, group in enumerate(group_requests(requests, max_batch=args.batch_size)):
        for batched in (i % 2 == 0, i % 2 == 1):  # interleaved, in turn first: a passing load hits both alike
            start = time.perf_counter()
            for part in [group] if batched else [[r] for r in group]:
                run_batch(lambda task: pipe, part)
            if batched:
                together += time.perf_counter() - start
            else:
                alone += time.perf_counter() - start
    return alone, together


def max_difference(generated: Path, batched: Path, count: int) -> int:
    manifest = [json.loads(line) for line in (batched / "manifest.jsonl").read_text().splitlines()][1:]
    files = {record["line"] - 1: batched / record["file"] for record in manifest}
    return max(int(np.abs(np.asarray(PIL.Image.open(generated / f"{i:05d}.png"), np.int16)
                          - np.asarray(PIL.Image.open(files[i]), np.int16)).max()) for i in range(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--model", default=None, help="default: the built-in demo model")
    parser.add_argument("--in-process-only", action="store_true", help="skip the two command-line runs")
    args = parser.parse_args()
    set_threads(args.threads)
    texts = prompts(args.images)
    flags = ["--steps", str(args.steps), "--guidance", "7.5", "--dtype", args.dtype, "--device", "cpu", "--quiet",
             "--no-safety-checker", *(["--model", args.model] if args.model else [])]
    print(machine())
    n = args.images
    if not args.in_process_only:
        run_commands(texts, flags, args)
    single, grouped = run_in_process(texts, args)
    print(f"  in-process, 1/call {single:7.1f} s  {n / single:6.2f} images/s")
    print(f"  in-process, {args.batch_size}/call {grouped:7.1f} s  {n / grouped:6.2f} images/s  "
          f"x{single / grouped:.2f}")


def run_commands(texts: list[str], flags: list[str], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        generated, batched = Path(scratch, "generate"), Path(scratch, "batch")
        generated.mkdir()
        batched.mkdir()
        loop = run_generate_loop(texts, flags, generated)
        batch = run_batch_command(texts, flags, batched, args.batch_size)
        difference = max_difference(generated, batched / "images", args.images)
    n = args.images
    print(f"{n} images, {args.steps} steps, {args.dtype}, batch size {args.batch_size}")
    print(f"  loop of generate   {loop:7.1f} s  {n / loop:6.2f} images/s")
    print(f"  stablepipe batch   {batch:7.1f} s  {n / batch:6.2f} images/s  x{loop / batch:.2f} the loop's rate"
          f"  (max pixel difference from generate's: {difference})")


if __name__ == "__main__":
    main()

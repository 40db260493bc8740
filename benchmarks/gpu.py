"""GPU benchmark: stablepipe against diffusers on the same card, whole images and memory options.

    python benchmarks/gpu.py --model sd15 --size 512 --steps 50 --dtype float16 bfloat16
    python benchmarks/gpu.py --model sdxl --size 1024 --steps 30 --dtype float16
    python benchmarks/gpu.py --tiny --device cpu --steps 2 --cases eager fused model_offload   # try it anywhere

Random weights in the real SD 1.5 / SDXL architectures (written once as a diffusers folder, in --dtype), loaded by
both libraries. Each case is a fresh subprocess: load, apply the case, one warm-up image (compiles, autotunes,
captures CUDA graphs), then `--repeat` timed images (median reported). Cases for both libraries: `eager`
(PyTorch SDPA attention), `channels_last`, `compile` (torch.compile of the UNet and the VAE decoder, default
mode), `cudagraphs` (torch.compile mode="reduce-overhead", which replays CUDA graphs), `model_offload`,
`sequential_offload`.
stablepipe only: `attention_slicing`, `vae_slicing_tiling`, `fused` (fused QKV projections). Reported: seconds
per image and its ratio to diffusers' same case, peak accelerator memory (torch.cuda.max_memory_allocated), and
the image's max abs difference from diffusers' eager image (0 to 1 scale). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, emit, write_folder  # noqa: E402

BOTH = ("eager", "channels_last", "compile", "cudagraphs", "model_offload", "sequential_offload")
OURS_ONLY = ("attention_slicing", "vae_slicing_tiling", "fused")
PROMPT = "a photograph of an astronaut riding a horse"


def apply_case(pipe, lib: str, case: str, device: str) -> None:
    """Put the pipeline on the device with the case's option, the way each library's users do it."""
    import torch

    if case == "model_offload":
        return pipe.enable_model_cpu_offload(device=device)
    if case == "sequential_offload":
        return pipe.enable_sequential_cpu_offload(device=device)
    pipe.to(device)
    if case == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    elif case in ("compile", "cudagraphs"):
        mode = "reduce-overhead" if case == "cudagraphs" else None
        pipe.unet.compile(mode=mode)
        pipe.vae.decoder.compile(mode=mode)
    elif case == "attention_slicing":
        pipe.enable_attention_slicing()
    elif case == "vae_slicing_tiling":
        pipe.enable_vae_slicing()
        pipe.enable_vae_tiling()
    elif case == "fused":
        pipe.fuse_qkv_projections()


def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    dtype, cuda = DTYPES[args.dtype[0]], args.device.startswith("cuda")
    module = __import__("diffusers" if args.lib == "diffusers" else "stablepipe")
    cls = getattr(module, "StableDiffusionXLPipeline" if args.model == "sdxl" else "StableDiffusionPipeline")
    extra = {} if args.model == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(args.folder, torch_dtype=dtype, **extra)
    apply_case(pipe, args.lib, args.case, args.device)
    pipe.set_progress_bar_config(disable=True)

    def image(steps: int):
        out = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=steps, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        return out

    image(args.steps)  # warm-up: compiling, autotuning, graph capture, cuDNN / oneDNN kernel choice
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):  # one image moved by up to 40 % between runs on an H200: take the median
        start = time.perf_counter()
        result = image(args.steps)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    np.save(args.save, np.asarray(result, dtype=np.float32))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    emit({"lib": args.lib, "case": args.case, "seconds": seconds, "peak_gib": peak})


def run_case(args: argparse.Namespace, lib: str, case: str, dtype: str, save: Path) -> dict | None:
    command = [sys.executable, __file__, "--worker", "--lib", lib, "--case", case, "--dtype", dtype,
               "--model", args.model, "--folder", str(args.folder), "--size", str(args.size),
               "--steps", str(args.steps), "--device", args.device, "--save", str(save),
               "--repeat", str(args.repeat)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"  {lib} {case}: FAILED\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def compare(args: argparse.Namespace) -> None:
    import torch

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"# {card}, torch {torch.__version__}; {args.model} {args.size}px, {args.steps} steps")
    for dtype in args.dtype:
        folder = write_folder(args.folder / dtype, args.model, tiny=args.tiny, dtype=DTYPES[dtype])
        sub = argparse.Namespace(**{**vars(args), "folder": folder})
        with tempfile.TemporaryDirectory() as scratch:
            reference, theirs = Path(scratch, "diffusers-eager.npy"), {}
            for case in [c for c in args.cases if c in BOTH]:
                theirs[case] = run_case(sub, "diffusers", case, dtype, Path(scratch, f"diffusers-{case}.npy"))
                report(dtype, "diffusers", case, theirs[case], None, Path(scratch, f"diffusers-{case}.npy"), reference)
            for case in args.cases:
                ours = run_case(sub, "stablepipe", case, dtype, Path(scratch, f"stablepipe-{case}.npy"))
                report(dtype, "stablepipe", case, ours, theirs.get(case), Path(scratch, f"stablepipe-{case}.npy"),
                       reference)  # fmt: skip


def report(dtype: str, lib: str, case: str, result, theirs, image: Path, reference: Path) -> None:
    import numpy as np

    if result is None:
        return
    ratio = f"x{theirs['seconds'] / result['seconds']:.2f} vs diffusers" if theirs else ""
    diff = float(np.abs(np.load(image) - np.load(reference)).max()) if reference.is_file() else float("nan")
    print(f"{dtype:9s} {lib:10s} {case:20s} {result['seconds']:8.2f} s/image {ratio:18s} "
          f"peak {result['peak_gib']:6.2f} GiB  max abs diff vs diffusers eager {diff:.1e}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--size", type=int, default=None, help="default: 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--steps", type=int, default=None, help="default: 50 (sd15), 30 (sdxl)")
    parser.add_argument("--dtype", nargs="+", default=["float16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", nargs="+", default=list(BOTH + OURS_ONLY), choices=BOTH + OURS_ONLY)
    parser.add_argument("--tiny", action="store_true", help="toy-sized models, to try the script")
    parser.add_argument("--repeat", type=int, default=3, help="timed images per case (the median is reported)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "stablepipe-bench-gpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (1024 if args.model == "sdxl" else 512)
    args.steps = args.steps or (30 if args.model == "sdxl" else 50)
    if not args.worker:
        args.folder = args.folder / (args.model + ("-tiny" if args.tiny else ""))
    run_worker(args) if args.worker else compare(args)


if __name__ == "__main__":
    main()

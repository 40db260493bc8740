"""One whole SD 1.5 image: stablepipe and diffusers (bfloat16) against OpenVINO through optimum-intel, one run.

    python benchmarks/whole_image_openvino.py --size 512 --steps 20 --images 3 --threads 2
    python benchmarks/whole_image_openvino.py --size 256 --steps 4 --images 1      # the whole script, quickly

All sides make the same picture from the same full-size SD 1.5 folder with random weights (written once by
`common.write_sd15_folder`, float32, in the temp dir): seed 0, guidance 7.5 and the folder's PNDM scheduler, which
are `stablepipe generate`'s defaults, at --size px and --steps steps, on --threads threads.
- `stablepipe`: bfloat16 + channels-last, what the CLI's `--dtype auto` picks on a CPU with native bfloat16; the
  compiled attention kernel is built (or found in the cache) before the timing starts.
- `diffusers`: bfloat16, its default layout.
- `openvino`: `OVStableDiffusionPipeline` from the folder exported once to OpenVINO IR (optimum-intel's default
  export: float32 weights, no int8 at this size; the export is timed but not counted), reshaped to static shapes
  and compiled for the CPU with INFERENCE_NUM_THREADS = --threads. `+f32` / `+bf16` add the
  INFERENCE_PRECISION_HINT; without one, OpenVINO's own default runs (the table names the precision the compiled
  UNet reports). `+dynamic` keeps the dynamic shapes.
OpenVINO lives in its own venv (--ov-python; putting optimum-intel into the test venv downgrades transformers and
huggingface_hub). Make it with `python3 -m venv /work/ovenv && /work/ovenv/bin/pip install torch==2.13.0 &&
/work/ovenv/bin/pip install "optimum-intel[openvino]" diffusers torch==2.13.0 && /work/ovenv/bin/pip uninstall -y
torchvision` (the second torch pin keeps the resolver from replacing torch with 2.14; optimum-intel asks for a
torchvision, used only by its vision-language models, and PyPI's is a CUDA build whose import fails on the CPU torch
and takes transformers' image processors, so optimum.intel, down with it). The export reads the folder's CLIP
weights through a copy that adds the `text_model.` key prefix (see `export_source`).

Every variant runs in its own fresh subprocess, one after another (--rounds > 1 repeats that, alternating the
order): `load` is from_pretrained (+ reshape and compile for OpenVINO), `first` the first image of the process,
`steady` the median of the next --images images, `CPU` that image's process CPU time (all threads; less
disturbed than wall time by other processes on a shared machine). Speed-ups are wall-time ratios of the steady
images, per round (median over rounds), against diffusers and against the plain `openvino` variant. `peak RSS` is
the process's high-water mark over loading and all its images; `PSNR` is against diffusers' picture.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, peak_rss_mib, set_threads, write_sd15_folder  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5  # StableDiffusionPipeline's default, so the CLI's
OV_PYTHON = Path("/work/ovenv/bin/python")
OV_OPTIONS = {"f32", "bf16", "dynamic"}


# ---- in the subprocesses ----------------------------------------------------------------------------------------


def load_torch_pipeline(lib: str, folder: Path):
    """stablepipe (bfloat16 + channels-last, the CLI's CPU default) or diffusers (bfloat16): (pipeline, notes)."""
    import torch

    if lib == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
        return pipe, {"version": diffusers.__version__}
    import stablepipe
    from stablepipe.kernels import kernel_dtypes
    from stablepipe.kernels.build import compiled_ops

    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.enable_channels_last()
    kernel = compiled_ops() is not None and torch.bfloat16 in kernel_dtypes()
    return pipe, {"version": stablepipe.__version__, "attention": "compiled kernel" if kernel else "aten"}


def load_openvino_pipeline(folder: Path, options: list[str], size: int, threads: int):
    """optimum-intel's pipeline from the exported folder, compiled for the CPU: (pipeline, notes)."""
    import openvino
    from optimum.intel import OVStableDiffusionPipeline
    from optimum.intel.version import __version__ as optimum_intel_version

    ov_config = {"INFERENCE_NUM_THREADS": str(threads)}
    for hint in {"f32", "bf16"} & set(options):
        ov_config["INFERENCE_PRECISION_HINT"] = hint
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, ov_config=ov_config, compile=False)
    if "dynamic" not in options:
        pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what the UNet runs in
    return pipe, {
        "version": f"openvino {openvino.__version__}, optimum-intel {optimum_intel_version}",
        "precision": precision,
    }


def run_worker(args: argparse.Namespace) -> None:
    """Load one variant's pipeline, make 1 + --images images, report the times and save the last image."""
    import numpy as np
    import torch

    set_threads(args.threads)
    start = time.perf_counter()
    if args.lib == "openvino":
        pipe, notes = load_openvino_pipeline(args.ov_folder, args.options, args.size, args.threads)
    else:
        pipe, notes = load_torch_pipeline(args.lib, args.folder)
    pipe.set_progress_bar_config(disable=True)
    load_s, rss_loaded = time.perf_counter() - start, peak_rss_mib()
    wall, cpu = [], []
    for _ in range(1 + args.images):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        generator = torch.Generator().manual_seed(0)
        image = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                     guidance_scale=GUIDANCE, generator=generator, output_type="np").images[0]  # fmt: skip
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    np.save(args.save, np.asarray(image, dtype=np.float32))
    emit({**notes, "scheduler": type(pipe.scheduler).__name__, "load_s": load_s, "wall_s": wall, "cpu_s": cpu,
          "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak_rss_mib()})  # fmt: skip


def export_source(folder: Path, scratch: Path) -> Path:
    """The folder as the OpenVINO venv's transformers (< 5.6, optimum-intel's pin) reads it: a copy (links, but
    for the text encoder) whose CLIP weights carry the `text_model.` prefix of the real SD 1.5 files. transformers
    5.24 saves them without it, and 5.5 would silently load a CLIP text encoder with new random weights."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    source = scratch / folder.name
    (source / "text_encoder").mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name != "text_encoder":
            (source / entry.name).symlink_to(entry.resolve())
    (source / "text_encoder" / "config.json").symlink_to((folder / "text_encoder" / "config.json").resolve())
    weights = load_file(folder / "text_encoder" / "model.safetensors")
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()},
              source / "text_encoder" / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    _, info = CLIPTextModel.from_pretrained(source / "text_encoder", output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RuntimeError(f"the text encoder of {folder} does not load in the OpenVINO venv's transformers: "
                           f"missing {info['missing_keys'][:3]}, unexpected {info['unexpected_keys'][:3]}")  # fmt: skip
    return source


def run_export(args: argparse.Namespace) -> None:
    """optimum-intel's default export of the diffusers folder to OpenVINO IR, written to --ov-folder."""
    import openvino
    from optimum.intel import OVStableDiffusionPipeline

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        source = export_source(args.folder, Path(scratch))
        pipe = OVStableDiffusionPipeline.from_pretrained(source, export=True, compile=False)
    staging = args.ov_folder.with_name(args.ov_folder.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(staging)
    weights = sorted({op.get_element_type().get_type_name() for op in pipe.unet.model.get_ops()
                      if op.get_type_name() == "Constant" and len(op.shape) >= 2})  # fmt: skip
    record = {"export_s": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "unet_weights": weights,
              "openvino": openvino.__version__}  # fmt: skip
    (staging / "export.json").write_text(json.dumps(record))
    staging.rename(args.ov_folder)


# ---- in the parent ----------------------------------------------------------------------------------------------


def subprocess_result(command: list[str], what: str, threads: int) -> dict:
    """The last RESULT line of a subprocess, or an error with its stderr's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def export_openvino(args: argparse.Namespace) -> dict:
    """The OpenVINO export of the folder, made once (its record, export.json, says how long it took)."""
    record = args.ov_folder / "export.json"
    if not record.is_file():
        command = [str(args.ov_python), __file__, "--export", "--folder", str(args.folder),
                   "--ov-folder", str(args.ov_folder)]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(record.read_text())


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'openvino+f32' -> ('openvino', ['f32']); a clear error for an unknown library or option."""
    lib, *options = spec.split("+")
    if lib not in ("stablepipe", "diffusers", "openvino") or (options and lib != "openvino"):
        raise SystemExit(f"--variants: {spec!r} is not stablepipe, diffusers or openvino[+f32|+bf16|+dynamic]")
    if unknown := set(options) - OV_OPTIONS:
        raise SystemExit(f"--variants: {spec!r} has unknown options {sorted(unknown)}; known: {sorted(OV_OPTIONS)}")
    return lib, options


def run_variant(args: argparse.Namespace, spec: str, save: Path) -> dict:
    lib, options = parse_variant(spec)
    python = args.ov_python if lib == "openvino" else sys.executable
    command = [str(python), __file__, "--worker", "--lib", lib, "--folder", str(args.folder),
               "--ov-folder", str(args.ov_folder), "--size", str(args.size), "--steps", str(args.steps),
               "--images", str(args.images), "--threads", str(args.threads), "--save", str(save),
               "--options", *options]  # fmt: skip
    return subprocess_result(command, spec, args.threads)


def steady(run: dict) -> float:
    """The run's steady image time: the median after its first image (the first one where there is no other)."""
    return statistics.median(run["wall_s"][1:] or run["wall_s"])


def speed_up(runs: dict[str, list[dict]], base: str, name: str) -> str:
    """Median over rounds of base's steady time / name's, or '-' where the base was not run."""
    if base not in runs:
        return "-"
    return f"x{statistics.median(steady(b) / steady(o) for b, o in zip(runs[base], runs[name])):.2f}"


def psnr_against(image_path: Path, reference_path: Path) -> str:
    import numpy as np

    if not reference_path.is_file() or image_path == reference_path:
        return "-"
    error = np.mean((np.load(image_path).astype(np.float64) - np.load(reference_path)) ** 2)
    return f"{10 * np.log10(1 / max(float(error), 1e-20)):.1f} dB"


def print_table(args: argparse.Namespace, runs: dict[str, list[dict]], scratch: Path) -> None:
    print(f"{'variant':18s} {'precision':9s} {'load s':>7s} {'first s':>8s} {'steady s':>9s} {'CPU s':>7s} "
          f"{'vs diffusers':>12s} {'vs openvino':>11s} {'peak RSS':>9s} {'PSNR':>8s}")  # fmt: skip
    for name, rounds in runs.items():
        last = rounds[-1]
        precision = last.get("precision", "bf16")
        cpu = statistics.median(statistics.median(r["cpu_s"][1:] or r["cpu_s"]) for r in rounds)
        print(f"{name:18s} {precision:9s} {statistics.median(r['load_s'] for r in rounds):7.1f} "
              f"{statistics.median(r['wall_s'][0] for r in rounds):8.1f} "
              f"{statistics.median(steady(r) for r in rounds):9.1f} {cpu:7.1f} "
              f"{speed_up(runs, 'diffusers', name):>12s} {speed_up(runs, 'openvino', name):>11s} "
              f"{max(r['peak_rss_mib'] for r in rounds):5.0f} MiB "
              f"{psnr_against(scratch / f'{name}.npy', scratch / 'diffusers.npy'):>8s}")  # fmt: skip
    for name, rounds in runs.items():
        notes = {k: rounds[-1][k] for k in ("version", "attention", "scheduler") if k in rounds[-1]}
        print(f"# {name}: " + ", ".join(f"{k} {v}" for k, v in notes.items()))


def compare(args: argparse.Namespace) -> None:
    for spec in args.variants:
        parse_variant(spec)
    if any(spec.startswith("openvino") for spec in args.variants) and not args.ov_python.is_file():
        raise SystemExit(f"--ov-python: no Python at {args.ov_python}; make the OpenVINO venv as this script's "
                         "docstring says (python benchmarks/whole_image_openvino.py --help)")  # fmt: skip
    write_sd15_folder(args.folder)
    print(f"# command: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(f"# {machine()}")
    print(
        f"# SD 1.5 (random weights, {args.folder}), {args.size}x{args.size}, {args.steps} steps, guidance "
        f"{GUIDANCE}, batch 1, seed 0; {args.images} steady image(s) after the first, {args.rounds} round(s)"
    )
    if any(spec.startswith("openvino") for spec in args.variants):
        export = export_openvino(args)
        print(f"# OpenVINO export (not counted): {export['export_s']:.0f} s, peak RSS {export['peak_rss_mib']:.0f} "
              f"MiB, UNet weights {'/'.join(export['unet_weights'])}, openvino {export['openvino']}")  # fmt: skip
    if "stablepipe" in args.variants:
        from stablepipe.kernels.build import compiled_ops

        start = time.perf_counter()
        found = compiled_ops() is not None
        print(f"# stablepipe's attention kernel (not counted): {'built or loaded' if found else 'not available'} "
              f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
    runs: dict[str, list[dict]] = {spec: [] for spec in args.variants}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for spec in args.variants if r % 2 == 0 else args.variants[::-1]:
                runs[spec].append(run_variant(args, spec, Path(scratch, f"{spec}.npy")))
        print_table(args, runs, Path(scratch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=3, help="steady images after the first, per process")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant (order alternates)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["stablepipe", "diffusers", "openvino", "openvino+f32"],
        help="stablepipe, diffusers, openvino[+f32|+bf16|+dynamic] (default: %(default)s)",
    )
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "stablepipe-bench-sd15")
    parser.add_argument("--ov-folder", type=Path, default=None, help="the OpenVINO export (default: FOLDER-openvino)")
    parser.add_argument("--ov-python", type=Path, default=OV_PYTHON, help="the OpenVINO venv's python")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--options", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ov_folder = args.ov_folder or args.folder.with_name(args.folder.name + "-openvino")
    if args.images < 0 or args.rounds < 1 or args.threads < 1 or args.size % 8:
        parser.error("--images >= 0, --rounds >= 1, --threads >= 1 and --size a multiple of 8, please")
    if args.worker:
        run_worker(args)
    elif args.export:
        run_export(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()

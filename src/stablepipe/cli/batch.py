"""`stablepipe batch JOBS.jsonl --out DIR [--resume] [--ray [ADDRESS]]`: many images from a job file."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import UsageError, add_model_flags

RAY_MISSING = 'Ray is not installed: pip install "stablepipe[ray]"'


def register(commands) -> None:
    parser = commands.add_parser(
        "batch", help="many images from a JSONL job file (resumable; on a Ray cluster with --ray)",
        description="Draw one image per line of JOBS (JSON objects: prompt, negative_prompt, seed, width, height, "
        "steps, sampler, guidance, task txt2img/img2img/inpaint/upscale, image, mask, strength; paths relative to "
        "the file). Each image is written atomically with its infotext and recorded in DIR/manifest.jsonl; "
        "--resume draws exactly the missing ones.",
    )
    parser.add_argument("jobs", help="the JSONL job file, one request per line")
    parser.add_argument("--out", required=True, help="the output folder (images and manifest.jsonl)")
    parser.add_argument("--resume", action="store_true", help="continue the job in --out: draw only missing images")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="at most this many compatible requests share one UNet call (default 4)")
    add_model_flags(parser)
    parser.add_argument("--upscaler", help="the x4 upscaler for `upscale` lines (default: the built-in tiny one)")
    defaults = parser.add_argument_group("defaults for lines that leave a field out")
    defaults.add_argument("--negative-prompt", default=None)
    defaults.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    defaults.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    defaults.add_argument("--scheduler", default=None, help='sampler by its usual name, e.g. "DPM++ 2M Karras"')
    defaults.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    defaults.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    ray = parser.add_argument_group("Ray cluster")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="spread the work over Ray workers: a cluster ADDRESS (host:port, or 'auto'), or none to "
                          "start Ray here")
    ray.add_argument("--workers", type=int, default=None,
                     help="Ray workers, one pipeline each (default: one per GPU of the cluster, else per CPU)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the images and counts as JSON")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def model_options(args: argparse.Namespace):
    from stablepipe.batch.draw import ModelOptions

    return ModelOptions(
        model=args.model, upscaler=args.upscaler, variant=args.variant, revision=args.revision, device=args.device,
        dtype=args.dtype, no_safety_checker=args.no_safety_checker, config=args.config, lora=tuple(args.lora),
        embedding=tuple(args.embedding), prompt_weighting=args.prompt_weighting,
    )


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.batch.runner import BatchRun, run_local

    defaults = {"negative_prompt": args.negative_prompt, "steps": args.steps, "guidance": args.guidance,
                "sampler": args.scheduler, "width": args.width, "height": args.height}
    options = model_options(args)
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError(RAY_MISSING) from None
    batch = BatchRun.prepare(args.jobs, args.out, options, resume=args.resume, defaults=defaults,
                             batch_size=args.batch_size)
    if batch.redrawn:
        say(f"{len(batch.redrawn)} images listed as done were missing or damaged: drawing them again")
    say(f"{len(batch.jobs)} requests, {len(batch.jobs) - batch.pending_count} done before, "
        f"{batch.pending_count} to draw")
    quiet = args.quiet or args.json
    if args.ray is None:
        return run_local(batch, options, say=say, quiet=quiet)
    from stablepipe.batch.ray_runner import run_on_ray

    address = None if args.ray == "local" else args.ray
    return run_on_ray(batch, options, address=address, workers=args.workers, say=say, quiet=quiet)

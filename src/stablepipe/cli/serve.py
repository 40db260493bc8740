"""`stablepipe serve`: AUTOMATIC1111's HTTP API (`/sdapi/v1`) on http://HOST:PORT, with a queue and batching."""

from __future__ import annotations

import argparse
import ipaddress

from stablepipe.cli.common import DTYPES, UsageError
from stablepipe.model_flags import pick_device_and_dtype

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def register(commands) -> None:
    parser = commands.add_parser(
        "serve", help="AUTOMATIC1111-compatible HTTP API",
        description="Serve AUTOMATIC1111's API (/sdapi/v1: txt2img, img2img, extra-single-image, png-info, options, "
        "progress ...) so its clients (webuiapi, chat front ends, editor plugins) can use stablepipe. Waiting "
        "requests that can share a UNet call run as one batch, each image the same as alone. Needs the serve "
        'extra: pip install "stablepipe[serve]". The schema is at /docs.',
    )
    models = parser.add_argument_group("models")
    models.add_argument("--model", action="append", default=[], metavar="[NAME=]SOURCE",
                        help="a model to serve (Hub id, diffusers folder, .safetensors/.ckpt, or builtin), named NAME "
                        "(default: its folder or file name); repeat for several, the first is the current one "
                        "(default: the built-in demo model)")
    models.add_argument("--upscaler", metavar="[NAME=]SOURCE",
                        help="the x4 upscaler for extra-single-image (e.g. stabilityai/stable-diffusion-x4-upscaler, "
                        "or builtin for a tiny random one)")
    models.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    models.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, bfloat16 on CPUs "
                        "with native bfloat16, else float32")
    models.add_argument("--safety-checker", action="store_true", help="run a model's safety checker (A1111 has "
                        "none; off by default)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                        "only; 0.0.0.0 serves the network: use --api-auth then)")
    server.add_argument("--port", type=int, default=7861, help="port (default: 7861)")
    server.add_argument("--api-auth", metavar="USER:PW[,USER2:PW2]", help="HTTP basic auth for every route")
    server.add_argument("--out", default=None, help="folder for the images of requests with save_images "
                        "(generated names; default: none are saved)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 with "
                        "Retry-After (default: 16)")
    limits.add_argument("--max-pixels", type=int, default=1024 * 1024, help="width x height of one image "
                        "(default: 1048576); 0: no limit")
    limits.add_argument("--max-steps", type=int, default=150, help="steps of one image (default: 150); 0: no limit")
    limits.add_argument("--max-batch", type=int, default=8, help="images of one request (batch_size x n_iter), and "
                        "images in one pipeline call (default: 8)")
    limits.add_argument("--timeout", type=float, default=600, help="seconds a request may wait and run, then 504 "
                        "(default: 600); 0: none")
    limits.add_argument("--batch-wait", type=float, default=0.0, help="seconds to wait for more compatible "
                        "requests before a run starts alone (default: 0)")
    ray = parser.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help='serve on Ray Serve (pip install "stablepipe[ray]")')
    ray.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own models")
    ray.add_argument("--ray-address", default=None, help="the Ray cluster (default: RAY_ADDRESS or a local one)")
    parser.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_config(args: argparse.Namespace):
    """The ServeConfig the flags describe (a UsageError for bad values)."""
    from stablepipe.serve.config import BUILTIN, ModelSpec, ServeConfig, parse_api_auth

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    try:
        return ServeConfig(
            models=tuple(ModelSpec.parse(m) for m in args.model) or (ModelSpec(BUILTIN),),
            upscaler=ModelSpec.parse(args.upscaler) if args.upscaler else None,
            device=str(device), dtype=str(dtype).removeprefix("torch."), max_queue=args.max_queue,
            max_pixels=args.max_pixels or None, max_steps=args.max_steps or None, max_batch=args.max_batch,
            timeout=args.timeout or None, batch_wait=args.batch_wait, api_auth=parse_api_auth(args.api_auth),
            out_dir=args.out, safety_checker=args.safety_checker,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def run(args: argparse.Namespace, say) -> None:
    config = build_config(args)
    if not is_loopback(args.host) and not config.api_auth:
        say(f"WARNING: serving on {args.host} without --api-auth: anyone who can reach this port can use it")
    if args.ray:
        serve_with_ray(config, args, say)
        return
    try:
        import uvicorn

        from stablepipe.serve import create_app
        from stablepipe.serve.app import create_app as _needs_fastapi  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise UsageError("serve needs FastAPI and uvicorn: pip install 'stablepipe[serve]'") from None
        raise
    names = ", ".join(m.label for m in config.models)
    if not args.model:
        from stablepipe.builtin import builtin_model_note

        say(f"No --model given: serving {builtin_model_note()} as 'demo'.")
    say(f"Loading {names} ...")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    app = create_app(config)
    say(f"Serving {names} at http://{args.host}:{args.port}/sdapi/v1 (schema: /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def serve_with_ray(config, args: argparse.Namespace, say) -> None:
    """--ray: the same app in --replicas Ray Serve replicas (stablepipe.serve.ray_app)."""
    missing = UsageError("--ray needs Ray Serve: pip install 'stablepipe[ray]'")
    try:
        from stablepipe.serve.ray_app import serve_on_ray
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("ray", "stablepipe"):
            raise missing from None
        raise
    try:
        serve_on_ray(config, replicas=args.replicas, address=args.ray_address, host=args.host, port=args.port, say=say)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "ray":
            raise missing from None
        raise

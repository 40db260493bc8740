"""`stablepipe ui`: serve the web app, a tab per task, on http://HOST:PORT."""

from __future__ import annotations

import argparse
from pathlib import Path

from stablepipe.cli.common import UsageError, add_model_flags
from stablepipe.model_flags import pick_device_and_dtype


def register(commands) -> None:
    parser = commands.add_parser(
        "ui", help="the web app",
        description="Serve the web app: text-to-image, image-to-image, inpainting, depth-to-image, variations, "
        "upscaling, SDXL and LDM3D, one tab each, sharing the loaded weights. Needs the ui extra: "
        'pip install "stablepipe[ui]".',
    )
    add_model_flags(parser, model_files=False)  # the app loads models itself (its Load box takes single files)
    parser.add_argument_group("model").add_argument(
        "--load", action="append", default=[], metavar="ID_OR_PATH",
        help="another checkpoint to load at start (depth, variation, upscaler, SDXL base or refiner, LDM3D); "
        "it goes to its tab. Repeat for several",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                        "machine only; 0.0.0.0 serves the network)")
    server.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    server.add_argument("--out", default="outputs", help="folder for the PNGs (default: ./outputs)")
    server.add_argument("--allow-model-paths", action="store_true",
                        help="with a --host beyond this machine: let visitors load models from this machine's files "
                             "in the Load boxes (off by default there: Hub ids only)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> None:
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    local = check_host(args.host, args.port)
    try:
        from stablepipe.ui.app import build_app, launch
        from stablepipe.ui.session import ModelManager
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("gradio", "fastapi", "uvicorn"):
            raise UsageError('the web app needs gradio: pip install "stablepipe[ui]"') from None
        raise
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    manager = ModelManager(device=device, dtype=dtype, safety_checker=not args.no_safety_checker,
                           variant=args.variant, revision=args.revision)
    load_models(manager, args, say)  # the command line's models may be paths: whoever started the app chose them
    manager.allow_paths = local or args.allow_model_paths
    if not manager.allow_paths:
        say(f"Serving beyond this machine ({args.host}): the Load boxes take Hub ids only (--allow-model-paths "
            "lets visitors load this machine's files).")
    out_dir = Path(args.out)
    launch(build_app(manager, out_dir=out_dir), host=args.host, port=args.port, out_dir=out_dir)


def load_models(manager, args: argparse.Namespace, say) -> None:
    """--model (or the built-in model) and every --load, each into its slot."""
    import transformers

    from stablepipe.builtin import builtin_model_note

    transformers.utils.logging.disable_progress_bar()
    if args.model is None:
        say(f"No --model given: using {builtin_model_note()}.")
        manager.load("builtin")
    else:
        say(f"Loading {args.model} ...")
        manager.load(args.model)
    for source in args.load:
        say(f"Loading {source} ...")
        manager.load(source)


def check_host(host: str, port: int | None) -> bool:
    """--host resolves to an address, and --port (when given) is free on it; whether it is this machine only."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host}: cannot be resolved to an address ({err}); use e.g. 127.0.0.1, or 0.0.0.0 "
                         "to serve the network") from None
    family, _, _, _, address = infos[0]
    if port is not None:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(address[:2])
            except OSError as err:
                raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); pick another "
                                 "port, or leave --port out for the first free one") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)

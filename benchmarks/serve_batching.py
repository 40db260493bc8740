"""Throughput of `stablepipe serve` with N concurrent txt2img requests: batching on (compatible waiting requests
share one pipeline call) against off (`--max-batch 1`: one image per call), over real HTTP on 127.0.0.1.

    python benchmarks/serve_batching.py                       # the demo model, 16 requests, 20 steps, 32 px
    python benchmarks/serve_batching.py --model PATH --size 512 --requests 8 --device cuda --dtype float16

Both modes share one loaded model and run in turn, round after round; each round's time is wall time for all N
requests (sent at once by N client threads), and the ratio is taken per round. Every image is also checked
against the same seed's image from the other mode (batching must not change a picture).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import requests
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, set_threads  # noqa: E402


@contextlib.contextmanager
def serving(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def burst(port: int, bodies: list[dict]) -> tuple[float, dict[int, np.ndarray]]:
    """All requests at once, one client thread each; (wall seconds, seed -> image)."""
    images: dict[int, np.ndarray] = {}

    def send(body):
        answer = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=3600)
        answer.raise_for_status()
        png = base64.b64decode(answer.json()["images"][0])
        images[body["seed"]] = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), np.int16)

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="what to serve (default: the demo model)")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--max-batch", type=int, default=8, help="images per call with batching on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="width and height in pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    set_threads(args.threads)
    import transformers

    from stablepipe.builtin import DEMO_PROMPT
    from stablepipe.serve import ModelSpec, ServeConfig, create_app
    from stablepipe.serve.manager import ModelManager

    transformers.utils.logging.disable_progress_bar()
    base = dict(models=(ModelSpec(args.model, "model"),), device=args.device, dtype=args.dtype, max_queue=4096,
                max_pixels=None, timeout=None)
    manager = ModelManager(ServeConfig(**base))
    manager.load_all()
    modes = {"off": ServeConfig(**base, max_batch=1),
             "on": ServeConfig(**base, max_batch=args.max_batch, batch_wait=0.05)}
    apps = {name: create_app(config, manager=manager) for name, config in modes.items()}
    bodies = [{"prompt": DEMO_PROMPT if i % 2 else DEMO_PROMPT.replace("red", "blue"), "seed": 100 + i,
               "steps": args.steps, "width": args.size, "height": args.size, "cfg_scale": 3}
              for i in range(args.requests)]
    times: dict[str, list[float]] = {name: [] for name in modes}
    drawn: dict[str, dict[int, np.ndarray]] = {}
    with serving(apps["off"]) as off_port, serving(apps["on"]) as on_port:
        ports = {"off": off_port, "on": on_port}
        for port in ports.values():
            burst(port, bodies[:2])  # warm-up
        for _ in range(args.rounds):
            for name, port in ports.items():
                seconds, drawn[name] = burst(port, bodies)
                times[name].append(seconds)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    diff = max(int(np.abs(drawn["on"][s] - drawn["off"][s]).max()) for s in drawn["on"])
    ratios = [off / on for off, on in zip(times["off"], times["on"])]
    result = {
        "machine": machine(), "model": args.model, "device": args.device, "dtype": args.dtype,
        "requests": args.requests, "steps": args.steps, "size": args.size, "max_batch": args.max_batch,
        "images_per_s_off": round(args.requests / min(times["off"]), 3),
        "images_per_s_on": round(args.requests / min(times["on"]), 3),
        "speedup_median": round(statistics.median(ratios), 3), "speedup_per_round": [round(r, 3) for r in ratios],
        "calls_on": dict(apps["on"].state.stablepipe.queue.call_sizes),
        "max_pixel_diff_on_vs_off": diff,
    }
    print(json.dumps(result, indent=1))
    for app in apps.values():
        app.state.stablepipe.close()


if __name__ == "__main__":
    main()

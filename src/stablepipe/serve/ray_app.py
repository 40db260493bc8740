"""`stablepipe serve` on Ray Serve: the same FastAPI app (AUTOMATIC1111's `/sdapi/v1`) in N replicas.

Each replica builds its own app from the picklable `ServeConfig` (`create_app(config)`: its models, its run
queue and its request batcher, so compatible requests that reach a replica share a UNet call); Ray Serve's
HTTP proxy spreads requests over the replicas, restarts a replica that dies and, with `autoscaling`, adds and
removes replicas with the load. Two ways to run it:

    stablepipe serve --ray --replicas 2 --model sd15=stable-diffusion-v1-5/stable-diffusion-v1-5
    serve run src/stablepipe/serve/ray_serve.yaml      # the documented config file (`build_app` below)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from stablepipe.serve.config import ModelSpec, ServeConfig, parse_api_auth

RAY_MISSING = 'Ray Serve is not installed: pip install "stablepipe[ray]"'
APP_NAME = "stablepipe"
HEALTH_CHECK_PERIOD_S = 2.0  # how often Serve checks a replica (a dead one is replaced after a failed check)


def require_serve() -> Any:
    """`ray.serve`, or a ModuleNotFoundError (name "ray") saying how to install it."""
    try:
        from ray import serve
    except ImportError:
        raise ModuleNotFoundError(RAY_MISSING, name="ray") from None
    return serve


class StablepipeReplica:
    """One Serve replica: the app built from the config when the replica starts (models loaded there)."""

    def __init__(self, config: ServeConfig):
        self.config = config

    def __serve_build_asgi_app__(self):
        from stablepipe.serve import create_app

        return create_app(self.config)


def replica_options(config: ServeConfig) -> dict[str, Any]:
    """Ray resources of one replica: a GPU when the config runs on CUDA, else one CPU."""
    return {"num_gpus": 1} if config.device.startswith("cuda") else {"num_cpus": 1}


def build_deployment(config: ServeConfig, *, replicas: int = 1, autoscaling: Mapping[str, Any] | None = None,
                     actor_options: Mapping[str, Any] | None = None):
    """The bound Serve application: `replicas` copies (or Serve's `autoscaling_config`, e.g. {"min_replicas": 1,
    "max_replicas": 4, "target_ongoing_requests": 2}). Each replica takes up to its queue's worth of requests
    at once, so the app's own queue answers 503 + Retry-After when it is full and batches what it holds."""
    serve = require_serve()
    if autoscaling is None and replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    scale = {"autoscaling_config": dict(autoscaling)} if autoscaling else {"num_replicas": replicas}
    deployment = serve.deployment(
        serve.ingress()(StablepipeReplica), name=APP_NAME, max_ongoing_requests=config.max_queue + config.max_batch,
        ray_actor_options=dict(actor_options or replica_options(config)), health_check_period_s=HEALTH_CHECK_PERIOD_S,
        **scale,
    )
    return deployment.bind(config)


def serve_on_ray(config: ServeConfig, *, replicas: int = 1, address: str | None = None, host: str = "127.0.0.1",
                 port: int = 8000, autoscaling: Mapping[str, Any] | None = None, block: bool = True,
                 say=print) -> str:
    """Deploy the app on the Ray cluster at `address` (None: RAY_ADDRESS or a new local one), its HTTP proxy on
    host:port; returns the API's base URL. With `block`, serves until interrupted, then shuts Serve down."""
    serve = require_serve()
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_deployment(config, replicas=replicas, autoscaling=autoscaling), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}/sdapi/v1"
    say(f"stablepipe on Ray Serve: {replicas if not autoscaling else autoscaling} replicas at {url}")
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def build_app(args: Mapping[str, Any]):
    """The application builder of `serve run` config files (`import_path: stablepipe.serve.ray_app:build_app`):
    `args` are ServeConfig's fields, models as "NAME=SOURCE" strings; replicas and autoscaling are set in the
    file's `deployments:` section."""
    return build_deployment(config_from_args(args))


def config_from_args(args: Mapping[str, Any]) -> ServeConfig:
    """A ServeConfig from plain values (a config file's `args`); a ValueError names any unknown field."""
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown stablepipe serve setting {unknown[0]!r}; the settings are "
                         f"{', '.join(sorted(known))}")
    values = dict(args)
    if "models" in values:
        models = values["models"]
        values["models"] = tuple(ModelSpec.parse(m) for m in ([models] if isinstance(models, str) else models))
    if values.get("upscaler"):
        values["upscaler"] = ModelSpec.parse(values["upscaler"])
    if isinstance(values.get("api_auth"), str):
        values["api_auth"] = parse_api_auth(values["api_auth"])
    return ServeConfig(**values)

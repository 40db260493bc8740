"""What one server is: its models, limits, security and output folder, as one picklable dataclass.

`create_app(ServeConfig(...))` builds the app from it and nothing else (no global state), so a Ray Serve
replica can build its own copy from the same config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

BUILTIN = "builtin"  # the demo model (or the tiny random one where the package ships none)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to load: `source` is a Hub id, a diffusers folder, a single file or "builtin"; `name` is what
    clients call it (`sd_model_checkpoint`, `sd-models`); by default the source's last path part."""

    source: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`NAME=SOURCE` or `SOURCE` (a '=' inside a path is kept when the part before it has a '/')."""
        name, sep, source = text.partition("=")
        if sep and name and "/" not in name and "\\" not in name:
            return cls(source.strip(), name.strip())
        return cls(text.strip())

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.source == BUILTIN:
            return "demo"
        stem = Path(self.source.rstrip("/\\")).name
        return Path(stem).stem if Path(stem).suffix in (".safetensors", ".ckpt") else stem


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything `create_app` needs. Limits of None are off."""

    models: tuple[ModelSpec, ...] = (ModelSpec(BUILTIN),)
    upscaler: ModelSpec | None = None  # the x4 upscaler for /sdapi/v1/extra-single-image
    device: str = "cpu"
    dtype: str = "float32"  # float32, float16 or bfloat16
    max_queue: int = 16  # requests waiting (not running) beyond which new ones get 503 + Retry-After
    max_pixels: int | None = 1024 * 1024  # width * height of one image (after hires fix)
    max_steps: int | None = 150
    max_batch: int = 8  # images of one request (batch_size * n_iter), and images in one pipeline call
    timeout: float | None = 600.0  # seconds a request may wait and run before it gets 504
    batch_wait: float = 0.0  # seconds the batcher waits for more compatible requests before a run
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no authentication
    out_dir: str | None = None  # where images are saved (generated names) when a request asks; None: never
    max_body_bytes: int = 64 * 1024 * 1024
    safety_checker: bool = False  # A1111 has none; a model's own checker runs only when this is True
    prompt_weighting: bool = True  # read A1111's prompt syntax, (word:1.3), [word], BREAK, as A1111 does

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("ServeConfig needs at least one model")
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two models have the same name in {labels}; name them with NAME=SOURCE")
        for field in ("max_queue", "max_batch"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


def parse_api_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """A1111's `--api-auth user:password[,user2:password2]` -> (("user", "password"), ...)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth takes user:password[,user2:password2]; {item.strip()!r} has no "
                             "user:password")
        pairs.append((user, password))
    return tuple(pairs)

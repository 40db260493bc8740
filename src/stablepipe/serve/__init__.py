"""`stablepipe serve`: AUTOMATIC1111's HTTP API (`/sdapi/v1`) with a bounded queue and a request batcher.

Needs the serve extra (FastAPI, uvicorn): pip install "stablepipe[serve]".
"""

from __future__ import annotations

from stablepipe.serve.config import ModelSpec, ServeConfig, parse_api_auth

__all__ = ["ModelSpec", "ServeConfig", "create_app", "parse_api_auth"]


def create_app(config: ServeConfig, **kwargs):
    """The FastAPI app (imported here lazily, so the config needs no FastAPI)."""
    from stablepipe.serve.app import create_app as build

    return build(config, **kwargs)

"""What the web app's server refuses before gradio sees it: bodies over a size limit, and API calls to routes
or events that do not exist (404, where gradio itself answers 500).

The limits: uploads (pictures for image-to-image, inpainting ...) up to MAX_UPLOAD bytes; every other body (the
JSON of a request: prompts, settings) up to MAX_BODY. Prompts are limited to MAX_PROMPT_CHARS characters in
`ui/run.py`: the text encoder reads 77 tokens (prompt weighting: chunks of 75), so longer text only costs memory.
"""

from __future__ import annotations

import json
from typing import Any

MAX_UPLOAD = 32 * 2**20  # bytes: a 4096 x 4096 RGBA PNG is at most 64 MiB raw, and PNGs compress
MAX_BODY = 1 * 2**20  # bytes: a request's JSON (MAX_PROMPT_CHARS of prompt is at most 40 kB in UTF-8)
UPLOAD_PATHS = ("/gradio_api/upload",)


def body_limit(path: str) -> int:
    return MAX_UPLOAD if path.rstrip("/").endswith(UPLOAD_PATHS) else MAX_BODY


async def send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a body over its path's limit gets 413 (by Content-Length before reading it, or once
    that many bytes have streamed in); the body read so far is handed on to the app unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = body_limit(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_json(send, 413, too_large(int(declared), limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await send_json(send, 413, too_large(size, limit, streamed=True))
            if not message.get("more_body"):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)


def too_large(size: int, limit: int, *, streamed: bool = False) -> str:
    what = "more than " if streamed else ""
    return f"the request body is {what}{size / 2**20:.1f} MiB; this server takes at most {limit / 2**20:.0f} MiB"


def replay(body: bytes, receive):
    """A `receive` that gives the app the buffered body, then whatever the client sends next (a disconnect)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def not_found_handlers() -> dict[Any, Any]:
    """FastAPI exception handlers: an unknown API name or event index is a 404 naming where the list is."""
    from fastapi.responses import JSONResponse
    from gradio.route_utils import FnIndexInferError

    def unknown_endpoint(request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"no such API endpoint ({err}); the list is at /gradio_api/info"}, 404)

    def unknown_event(request, err: KeyError) -> JSONResponse:
        if not request.url.path.rstrip("/").endswith("/queue/join"):
            raise err
        return JSONResponse({"detail": f"no event with index {err}; the list is at /gradio_api/info"}, 404)

    return {FnIndexInferError: unknown_endpoint, KeyError: unknown_event}

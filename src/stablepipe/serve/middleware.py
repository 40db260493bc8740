"""ASGI middleware for every route (the docs and the schema too): HTTP basic auth and a body size limit."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Sequence

from starlette.exceptions import HTTPException


async def send_json(send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BasicAuth:
    """401 unless the request carries one of `users` (user, password) as HTTP basic auth (A1111's --api-auth)."""

    def __init__(self, app, *, users: Sequence[tuple[str, str]]):
        self.app = app
        self.users = [(u.encode(), p.encode()) for u, p in users]

    def allowed(self, header: bytes | None) -> bool:
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        found = False
        for known_user, known_password in self.users:  # every pair compared: no timing hint of which matched
            found |= secrets.compare_digest(user, known_user) & secrets.compare_digest(password, known_password)
        return bool(sep) and found

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allowed(dict(scope["headers"]).get(b"authorization")):
            await send_json(send, 401, "wrong or missing user:password (the server runs with --api-auth)",
                            [(b"www-authenticate", b'Basic realm="stablepipe"')])
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; FastAPI answers it as a 413 when it is reading the body."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the body is over {max_bytes} bytes")


class BodyLimit:
    """413 for a request body over `max_bytes` (by its Content-Length, or as it streams in)."""

    def __init__(self, app, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await send_json(send, 413, f"the body is over {self.max_bytes} bytes")
            return
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, f"the body is over {self.max_bytes} bytes")

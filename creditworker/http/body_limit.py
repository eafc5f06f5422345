"""A cap on request bodies, enforced before the app reads one: 413 instead of a body in memory.

A declared `Content-Length` above the cap is refused without reading a byte. A body of
unknown length (chunked) is read here chunk by chunk and refused as soon as it passes the
cap, so at most `max_body_bytes` are ever held; a body within the cap is handed on whole.
A declared length within the cap needs no counting: the server (h11, httptools) never
delivers more than the declared length.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from creditworker.http.responses import refusal_before_body

MAX_BODY_BYTES_VARIABLE = "CREDITWORKER_HTTP_MAX_BODY_BYTES"


class BodyLimit:
    """Refuse with 413 any request whose body is larger than `max_body_bytes`."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_body_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = refusal_before_body(
            scope, 413, "content_too_large",
            f"the request body is larger than {self.max_body_bytes} bytes, the most the "
            f"gateway reads ({MAX_BODY_BYTES_VARIABLE})",
            {"max_body_bytes": self.max_body_bytes},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when the body is chunked or the header is not a number
    (the server refuses such a request itself before the app sees it)."""
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the body read here to the app once; then the server's messages (disconnect)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay

"""Request body limit, enforced while the body streams in (also for chunked uploads without Content-Length).

A declared ``Content-Length`` over the limit is refused before anything is read; otherwise the bytes are
counted as the app reads them, and the read that crosses the limit raises ``BodyTooLargeError``, which the
app answers with a JSON 413. So no request ever holds more than the limit in memory.
(FastAPI's own ``max_body_size`` answers a declared oversize body in plain text, not in the API's JSON.)
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTooLargeError, error_response


class BodyLimitMiddleware:
    """Pure ASGI middleware: at most ``max_body_bytes`` of request body per request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            error = BodyTooLargeError(self.max_body_bytes)
            await error_response(error.status_code, error.code, error.message)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        await self.app(scope, receive_within_limit, send)

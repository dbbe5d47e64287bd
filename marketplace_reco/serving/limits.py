"""Request body limits, enforced while the body streams in (also for chunked uploads without Content-Length).

Size: a declared ``Content-Length`` over the limit is refused before anything is read; otherwise the bytes
are counted as the app reads them, and the read that crosses the limit raises ``BodyTooLargeError``, which
the app answers with a JSON 413. So no request ever holds more than the limit in memory.
(FastAPI's own ``max_body_size`` answers a declared oversize body in plain text, not in the API's JSON.)

Time: the whole body must arrive within ``body_timeout_s`` of its headers; a read that would wait past that
raises ``BodyTimeoutError`` (a JSON 408 that closes the connection), so a client that stops mid-upload does
not hold the request forever. (A body still arriving after an early answer, which the app never reads, is
held to the same deadline by the connection, ``connections.py``.)
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTimeoutError, BodyTooLargeError, error_response


class BodyLimitMiddleware:
    """Pure ASGI middleware: at most ``max_body_bytes`` of request body per request, within ``body_timeout_s``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

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
        body_pending = True
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def receive_within_limits() -> Message:
            nonlocal received, body_pending
            if not body_pending:  # waiting for a disconnect after the body has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeoutError(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
                body_pending = message.get("more_body", False)
            return message

        await self.app(scope, receive_within_limits, send)

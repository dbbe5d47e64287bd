"""Request body limits, enforced while the body streams in (also for chunked uploads without Content-Length).

Size: a declared ``Content-Length`` over the limit is refused before anything is read; otherwise the bytes
are counted as the app reads them, and the read that crosses the limit raises ``BodyTooLargeError``, which
the app answers with a JSON 413. So no request ever holds more than the limit in memory.
(FastAPI's own ``max_body_size`` answers a declared oversize body in plain text, not in the API's JSON.)

Time: the whole body must arrive within ``body_timeout_s`` of its headers; a read that would wait past that
raises ``BodyTimeoutError`` (a JSON 408), so a client that stops mid-upload does not hold the request forever.

A response sent before the body was read to its end (a refusal, an error) closes the connection: uvicorn
would otherwise keep it open for the rest of a body nobody reads, as long as the client trickles it.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTimeoutError, BodyTooLargeError, error_response


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length", "0")
    return headers.get("transfer-encoding", "").lower() == "chunked" or not length.isdigit() or int(length) > 0


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
        headers = Headers(scope=scope)
        body_pending = _has_body(headers)

        async def send_closing_if_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and body_pending:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            error = BodyTooLargeError(self.max_body_bytes)
            await error_response(error.status_code, error.code, error.message)(scope, receive, send_closing_if_unread)
            return
        received = 0
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

        await self.app(scope, receive_within_limits, send_closing_if_unread)

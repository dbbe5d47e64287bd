"""Connection-level limits, and the uvicorn configuration the service runs with (``uvicorn_config``).

uvicorn closes idle keep-alive connections, but its httptools protocol gives a connection that is still sending
a request line and headers all the time and all the memory it wants: connections that send a header byte now
and then are held forever (slowloris), and one endless header grows the process by as much as it sends.
``GuardedHttpToolsProtocol`` is that protocol with limits on each request's head (line and headers):

- time: it must be complete ``header_timeout_s`` after the connection opened, or after the first byte of a
  later request on it;
- size: at most ``MAX_HEAD_BYTES``.

Either answers with the API's JSON error (408 ``header_timeout``, 431 ``header_too_large``) and ends the
connection. A stalled body is the app's business (``limits.py``), where the answer goes through the app; but a
body still arriving after its answer (an early refusal: 401, 413, 404) is read by nobody, and uvicorn would
keep the connection as long as the client trickles it: it too must end within ``body_timeout_s`` of the
answer, or the connection is closed.

Ending a connection the client is still writing to would reset it, and the client could lose the answer
with its unread bytes: so the server sends the answer, stops writing (FIN), discards what still comes for up
to ``LINGER_S``, then closes (nginx's lingering close).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .schemas import ErrorDetail, ErrorResponse
from .settings import ServingSettings

logger = logging.getLogger(__name__)

#: Largest request line plus headers: h11 (uvicorn's other protocol) allows 16 KiB, nginx 32 KiB; an API
#: request needs a few hundred bytes.
MAX_HEAD_BYTES = 64 * 1024
#: How long a refused connection is read (and what it sends discarded) before it is closed.
LINGER_S = 2.0


def _raw_error(status_line: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 JSON error response that closes the connection, for use below the ASGI app."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump_json(exclude_none=True).encode()
    head = (f"HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit for each request's head, and a deadline for
    a body that is still arriving after its answer."""

    def __init__(self, *args: Any, header_timeout_s: float, body_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._unread_body_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering: what still comes is discarded
            return
        reading_head = self._head_deadline is not None
        if reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Counted per chunk, checked once the chunk is parsed: a chunk that ends the head may carry body bytes.
        if reading_head and self._head_deadline is not None and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse("431 Request Header Fields Too Large", "header_too_large",
                         f"the request line and headers are larger than {MAX_HEAD_BYTES:,} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_deadline is None:  # a later request on this connection; the first one's clock runs already
            self._start_head()

    def on_headers_complete(self) -> None:
        _cancel(self._head_deadline)
        self._head_deadline = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._unread_body_deadline is not None:
            # The body after an early answer is in; uvicorn's keep-alive timer went with its bytes, so the next
            # request's head is timed from now.
            self._unread_body_deadline.cancel()
            self._unread_body_deadline = None
            self._start_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._unread_body_deadline = self.loop.call_later(self._body_timeout_s, self._unread_body_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        _cancel(self._head_deadline)
        _cancel(self._unread_body_deadline)
        super().connection_lost(exc)

    def _start_head(self) -> None:
        self._head_bytes = 0
        self._head_deadline = self.loop.call_later(self._header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        self._refuse("408 Request Timeout", "header_timeout",
                     f"the request line and headers did not arrive within {self._header_timeout_s:g} s")

    def _unread_body_timed_out(self) -> None:
        self._unread_body_deadline = None
        logger.info("closing the connection of %s: the body after its answer did not end within %g s",
                    self._client_name(), self._body_timeout_s)
        self._linger()

    def _refuse(self, status_line: str, code: str, message: str) -> None:
        _cancel(self._head_deadline)
        self._head_deadline = None
        if self.transport.is_closing():
            return
        logger.info("closing the connection of %s: %s", self._client_name(), message)
        self.transport.write(_raw_error(status_line, code, message))
        self._linger()

    def _linger(self) -> None:
        """Stop writing, discard what the client still sends for ``LINGER_S``, then close (module docstring)."""
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _client_name(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def uvicorn_config(app: Any, settings: ServingSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``settings`` (host, port, connection limits), plus ``options``."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=partial(GuardedHttpToolsProtocol, header_timeout_s=settings.header_timeout_s,  # type: ignore[arg-type]
                     body_timeout_s=settings.body_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # any number of seconds works
        **options,
    )

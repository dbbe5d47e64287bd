"""Optional API keys: with keys configured, predictions, model listings and metrics need one of them.

A client sends its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; without a valid one the
answer is 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``. ``/health`` and ``/ready`` stay open
(probes of orchestrators and load balancers carry no key), and so do the API docs (``/docs``,
``/openapi.json``): they describe the API, which is no secret, and show how to send a key.

Keys are kept as SHA-256 digests and compared in constant time, every key every time, so neither the
answer's timing nor its content tells how much of a guess was right; no key is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from .errors import UnauthorizedError

_bearer = HTTPBearer(auto_error=False, description="an API key as a bearer token: `Authorization: Bearer <key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key: `X-API-Key: <key>`")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyCheck:
    """A dependency that lets a request through only with one of ``keys``."""

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        if not keys:
            raise ValueError("an API key check needs at least one key")
        self._digests = [_digest(key.get_secret_value()) for key in keys]

    def accepts(self, key: str) -> bool:
        given = _digest(key)
        matches = [hmac.compare_digest(given, digest) for digest in self._digests]  # every key, every time
        return any(matches)

    async def __call__(self, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                       header_key: Annotated[str | None, Depends(_header)]) -> None:
        key = header_key or (bearer.credentials if bearer is not None else None)
        if not key:
            raise UnauthorizedError("this server needs an API key: send 'Authorization: Bearer <key>' "
                                    "or 'X-API-Key: <key>'")
        if not self.accepts(key):
            raise UnauthorizedError("the API key is not valid")

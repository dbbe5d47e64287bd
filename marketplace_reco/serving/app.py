"""The FastAPI application: routers, API keys, shared state, JSON errors, metrics, body limits, model lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .auth import ApiKeyCheck
from .errors import ApiError, error_response
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .pool import ModelPool
from .routers import health, models, predict, prometheus, similar
from .settings import ServingSettings

logger = logging.getLogger(__name__)

_DESCRIPTION = """Predicts the root category of a second-hand marketplace listing from its photo (`/image`),
its text (`/text`) or both (`/combined`), and finds similar listings (`/similar`) in a listing index, whose vectors
`/embed` and `/embed/batch` return.
Every error is JSON: `{"error": {"code": ..., "message": ...}}`.
A server configured with API keys wants one on every route but `/health`, `/ready` and these docs:
`Authorization: Bearer <key>` or `X-API-Key: <key>`."""


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.code, exc.message, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    message = f"no endpoint {request.method} {request.url.path}" if status == HTTPStatus.NOT_FOUND else str(exc.detail)
    return error_response(status, code, message, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only where and what: echoing the input back could return a whole upload.
    details = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
    message = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in details)
    return error_response(422, "invalid_request", message, details=jsonable_encoder(details))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; the server log has the details")


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    """The service for ``settings`` (default: from the environment); models load when it starts."""
    settings = settings or ServingSettings()
    if not settings.endpoint_models() and not settings.extra_models:
        raise ValueError("no model to serve: set MARKETPLACE_IMAGE_MODEL, MARKETPLACE_TEXT_MODEL "
                         "and/or MARKETPLACE_COMBINED_MODEL (checkpoint names, folders, s3:// or hub ids)")
    api_keys = settings.accepted_api_keys()
    # Only with keys: the OpenAPI schema then shows the key schemes on exactly the routes that need one.
    needs_key = [Depends(ApiKeyCheck(api_keys))] if api_keys else []
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Process-wide and deliberate: one setting for every model, from the settings (see resolved_torch_threads).
        torch.set_num_threads(settings.resolved_torch_threads())
        pool = ModelPool(settings, metrics)
        app.state.pool = pool
        pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="marketplace_reco", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    # Last added runs first: metrics also count the 413s and 408s of the body limits.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(health.router)
    app.include_router(predict.router, dependencies=needs_key)
    app.include_router(similar.router, dependencies=needs_key)
    app.include_router(models.router, dependencies=needs_key)
    app.include_router(prometheus.router, dependencies=needs_key)
    return app

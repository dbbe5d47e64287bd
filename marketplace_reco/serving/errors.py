"""Errors the service answers with: each carries its HTTP status and a stable machine-readable code."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from .schemas import ErrorDetail, ErrorResponse


class ApiError(Exception):
    """Base class: ``status_code`` and ``code`` go into the JSON error, the message says what was wrong."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadImageError(ApiError):
    status_code = 400
    code = "bad_image"


class NoModelError(ApiError):
    """The endpoint has no model configured, or the requested model is not served."""

    status_code = 404
    code = "unknown_model"


class ImageTooLargeApiError(ApiError):
    status_code = 413
    code = "image_too_large"


class UnsupportedMediaTypeError(ApiError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInputError(ApiError):
    status_code = 422
    code = "invalid_input"


class ModelNotReadyError(ApiError):
    status_code = 503
    code = "model_not_ready"


class BodyTooLargeError(ApiError):
    status_code = 413
    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit:,} bytes")


def error_response(status_code: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error every failure answers with: ``{"error": {"code", "message"[, "details"]}}``."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status_code, headers=headers)

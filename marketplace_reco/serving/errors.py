"""Errors the service answers with: each carries its HTTP status and a stable machine-readable code.

Every excess of a limit is a 413, whatever was counted (bytes, pixels, characters, inputs), each with its own
code; every refusal because the server is busy is a 503 with ``Retry-After``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi.responses import JSONResponse

from .schemas import ErrorDetail, ErrorResponse

#: What a 503 tells clients to wait before they try again: a micro-batch takes milliseconds to a second.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """Base class: ``status_code`` and ``code`` go into the JSON error, the message says what was wrong."""

    status_code = 500
    code = "internal_error"
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadImageError(ApiError):
    status_code = 400
    code = "bad_image"


class UnauthorizedError(ApiError):
    """No API key, or one the server does not accept (only when the server has keys)."""

    status_code = 401
    code = "unauthorized"
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class NoModelError(ApiError):
    """The endpoint has no model configured, or the requested model is not served."""

    status_code = 404
    code = "unknown_model"


class BodyTimeoutError(ApiError):
    """The request body did not arrive in time (a client that stalls mid-upload)."""

    status_code = 408
    code = "body_timeout"
    # The client is stalled: keeping its connection would only keep waiting for it.
    headers: ClassVar[dict[str, str] | None] = {"Connection": "close"}

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class ImageTooLargeApiError(ApiError):
    status_code = 413
    code = "image_too_large"


class BodyTooLargeError(ApiError):
    status_code = 413
    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit:,} bytes")


class TooManyInputsError(ApiError):
    """More images, texts or other form fields in one request than allowed."""

    status_code = 413
    code = "too_many_inputs"


class TooManyPixelsError(ApiError):
    """The photos of one request declare more pixels in all than allowed."""

    status_code = 413
    code = "too_many_pixels"


class TextTooLongError(ApiError):
    """The texts of one request have more characters in all than allowed."""

    status_code = 413
    code = "text_too_long"


class UnsupportedMediaTypeError(ApiError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInputError(ApiError):
    status_code = 422
    code = "invalid_input"


class UnknownListingApiError(ApiError):
    """A /similar query by a listing id the index does not hold."""

    status_code = 404
    code = "unknown_listing"


class IndexModelMismatchError(ApiError):
    """The served model is not the model revision that built the listing index."""

    status_code = 409
    code = "index_model_mismatch"


class SearchFailedError(ApiError):
    """The index or the database failed (not the query): the server log has the details."""

    status_code = 503
    code = "search_failed"


class ModelOutputInvalidError(ApiError):
    """The model answered with probabilities that are not finite numbers: it is broken, not the input."""

    status_code = 500
    code = "model_output_invalid"


class ModelNotReadyError(ApiError):
    status_code = 503
    code = "model_not_ready"


class OverloadedError(ApiError):
    """The model's queue is full: the request is refused at once rather than left to wait."""

    status_code = 503
    code = "overloaded"
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": str(RETRY_AFTER_S)}


class InferenceTimeoutError(ApiError):
    """The prediction did not finish within the per-request deadline."""

    status_code = 503
    code = "inference_timeout"
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": str(RETRY_AFTER_S)}

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the prediction did not finish within {timeout_s:g} s; the server is busy, "
                         f"try again in {RETRY_AFTER_S} s")


def error_response(status_code: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error every failure answers with: ``{"error": {"code", "message"[, "details"]}}``."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status_code, headers=headers)

"""Reading prediction inputs from a request: multipart/url-encoded forms, and JSON for text.

The field names are ``image`` and ``text``; the original service's clients send ``img`` and ``txt``,
which are accepted too. Photos must be file uploads; a file declared as something other than an image
is refused with 415 before any decoding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from .dependencies import SettingsDep
from .errors import InvalidInputError, UnsupportedMediaTypeError
from .pool import ImageUpload
from .schemas import TextBatchRequest, TextRequest
from .settings import ServingSettings

IMAGE_FIELDS = ("image", "img")
TEXT_FIELDS = ("text", "txt")
_FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_JSON_MEDIA_TYPE = "application/json"


@dataclass
class PredictInputs:
    """The photos (still encoded) and texts of one request, in the order they were sent."""

    images: list[ImageUpload] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _form_values(form: FormData, names: tuple[str, ...]) -> list[str | UploadFile]:
    """The values of any of ``names`` in the order they were sent (``image`` and ``img`` may be mixed)."""
    return [value for name, value in form.multi_items() if name in names]


async def _read_images(form: FormData) -> list[ImageUpload]:
    uploads = []
    for value in _form_values(form, IMAGE_FIELDS):
        if not isinstance(value, UploadFile):
            raise InvalidInputError("the field 'image' must be a file upload (multipart/form-data), not a text value")
        declared = _media_type(value.content_type)
        # Clients that do not know the type send none or octet-stream; the decoder decides then.
        if declared and declared != "application/octet-stream" and not declared.startswith("image/"):
            raise UnsupportedMediaTypeError(f"the file {value.filename or '(unnamed)'!r} is {declared}, not an image")
        uploads.append(ImageUpload(await value.read(), value.filename))
    return uploads


def _read_texts(form: FormData) -> list[str]:
    texts = []
    for value in _form_values(form, TEXT_FIELDS):
        if not isinstance(value, str):
            raise InvalidInputError("the field 'text' must be a text value, not a file")
        texts.append(value)
    return texts


def _parse_json(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=body) from exc


def _check_count(inputs: PredictInputs, batch: bool, endpoint: str, limit: int) -> PredictInputs:
    for what, count in (("image", len(inputs.images)), ("text", len(inputs.texts))):
        if not batch and count > 1:
            raise InvalidInputError(f"send one {what} to /{endpoint}, or several to /{endpoint}/batch; got {count}")
        if count > limit:
            raise InvalidInputError(f"at most {limit} {what}s per request; got {count}")
    return inputs


def _require(inputs: PredictInputs, images: bool, texts: bool) -> PredictInputs:
    if images and not inputs.images:
        raise InvalidInputError("missing the file field 'image' (or 'img')")
    if texts and not inputs.texts:
        raise InvalidInputError("missing the field 'text' (or 'txt')")
    return inputs


async def _read_form(request: Request, settings: ServingSettings, *, images: bool, texts: bool) -> PredictInputs:
    media_type = _media_type(request.headers.get("content-type"))
    if media_type not in _FORM_MEDIA_TYPES:
        wanted = "a file field 'image'" + (" and a field 'text'" if texts else "")
        raise UnsupportedMediaTypeError(f"send multipart/form-data with {wanted}; "
                                        f"got {media_type or 'a body without Content-Type'}")
    limit = settings.max_items_per_request
    async with request.form(max_files=limit, max_fields=limit) as form:
        inputs = PredictInputs(await _read_images(form) if images else [], _read_texts(form) if texts else [])
    return _require(inputs, images, texts)


def form_inputs(endpoint: str, *, images: bool, texts: bool, batch: bool
                ) -> Callable[[Request, ServingSettings], Awaitable[PredictInputs]]:
    """A dependency reading the photos and/or texts of a form request to ``/<endpoint>[/batch]``."""

    async def read(request: Request, settings: SettingsDep) -> PredictInputs:
        inputs = await _read_form(request, settings, images=images, texts=texts)
        return _check_count(inputs, batch, endpoint, settings.max_items_per_request)

    return read


def text_inputs(*, batch: bool) -> Callable[[Request, ServingSettings], Awaitable[PredictInputs]]:
    """A dependency reading the texts of ``/text[/batch]``: JSON (``{"text": ...}``, ``{"texts": [...]}``) or a form."""

    async def read(request: Request, settings: SettingsDep) -> PredictInputs:
        media_type = _media_type(request.headers.get("content-type"))
        if media_type == _JSON_MEDIA_TYPE:
            body = await request.body()
            if batch:
                inputs = PredictInputs(texts=_parse_json(TextBatchRequest, body).texts)
            else:
                inputs = PredictInputs(texts=[_parse_json(TextRequest, body).text])
        elif media_type in _FORM_MEDIA_TYPES:
            inputs = await _read_form(request, settings, images=False, texts=True)
        else:
            example = '{"texts": [...]}' if batch else '{"text": "..."}'
            raise UnsupportedMediaTypeError(f"send application/json {example} or a form with the field 'text'; "
                                            f"got {media_type or 'a body without Content-Type'}")
        return _check_count(inputs, batch, "text", settings.max_items_per_request)

    return read

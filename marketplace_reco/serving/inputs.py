"""Reading prediction inputs from a request: multipart/url-encoded forms, and JSON for text.

The field names are ``image`` and ``text``; the original service's clients send ``img`` and ``txt``,
which are accepted too. Photos must be file uploads; a file declared as something other than an image
is refused with 415 before any decoding.

Every request is held to the same budgets, form or JSON, and each excess is a 413 with its own code
(``errors.py``): at most ``max_items_per_request`` images and texts (and other form fields), at most
``max_request_text_chars`` characters of text in all, and at most ``max_request_pixels`` pixels of photos in
all, read from the photos' headers before any of them is decoded. Form text must be UTF-8 (or the charset
the request declares): anything else is refused with the field's name, never decoded into replacement
characters or Latin-1 guesses.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from ..data.errors import ImageTooLargeError
from .dependencies import SettingsDep
from .errors import (
    ImageTooLargeApiError,
    InvalidInputError,
    TextTooLongError,
    TooManyInputsError,
    TooManyPixelsError,
    UnsupportedMediaTypeError,
)
from .pool import ImageUpload
from .schemas import SimilarRequest, TextBatchRequest, TextRequest
from .settings import ServingSettings

IMAGE_FIELDS = ("image", "img")
TEXT_FIELDS = ("text", "txt")
_MULTIPART = "multipart/form-data"
_URLENCODED = "application/x-www-form-urlencoded"
_FORM_MEDIA_TYPES = (_MULTIPART, _URLENCODED)
_JSON_MEDIA_TYPE = "application/json"


@dataclass
class PredictInputs:
    """The photos (still encoded) and texts of one request, in the order they were sent."""

    images: list[ImageUpload] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _field_kind(name: str) -> str:
    return "image" if name in IMAGE_FIELDS else "text" if name in TEXT_FIELDS else "other field"


class _FieldCounter:
    """Counts a form's fields by kind as they arrive; the first one over the limit is refused."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        kind = _field_kind(name)
        self._counts[kind] += 1
        if self._counts[kind] > self._limit:
            raise TooManyInputsError(f"at most {self._limit} {kind}s per request")


def _not_utf8(name: str, reason: str) -> InvalidInputError:
    return InvalidInputError(f"the field {name!r} is not UTF-8 text ({reason}); send text encoded as UTF-8")


class _CheckedMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, counting fields as they arrive and refusing text that does not decode.

    (Starlette itself decodes such text as Latin-1 without a word, so 'café' sent in another encoding would
    be predicted as 'cafÃ©' or worse.)
    """

    def __init__(self, headers: Headers, stream: AsyncGenerator[bytes, None], *, max_items: int,
                 max_body_bytes: int) -> None:
        # The counter replaces starlette's file and field counts; the body limit bounds any one part.
        super().__init__(headers, stream, max_files=math.inf, max_fields=math.inf, max_part_size=max_body_bytes)
        self._counter = _FieldCounter(max_items)

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        self._counter.add(self._current_part.field_name)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and part.field_name in TEXT_FIELDS:
            try:
                part.data.decode(self._charset)
            except UnicodeDecodeError as exc:
                raise _not_utf8(part.field_name, f"{exc.reason} at byte {exc.start}") from None
        super().on_part_end()


async def _parse_multipart(request: Request, settings: ServingSettings) -> FormData:
    parser = _CheckedMultiPartParser(request.headers, request.stream(), max_items=settings.max_items_per_request,
                                     max_body_bytes=settings.max_body_bytes)
    try:
        return await parser.parse()
    except MultiPartException as exc:  # malformed multipart: what starlette answers, as the API's JSON
        raise HTTPException(status_code=400, detail=exc.message) from exc


async def _parse_urlencoded(request: Request, settings: ServingSettings) -> FormData:
    body = await request.body()
    limit = settings.max_items_per_request
    if body.count(b"&") >= 3 * limit:  # bounded before parsing: a field is a few bytes
        raise TooManyInputsError(f"at most {limit} images, {limit} texts and {limit} other fields per request")
    try:
        # Clients may send UTF-8 raw (curl -d) or percent-encoded; both must decode.
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the form is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    counter = _FieldCounter(limit)
    pairs = parse_qsl(decoded, keep_blank_values=True, encoding="utf-8", errors="surrogateescape")
    for name, value in pairs:
        counter.add(name)
        # surrogateescape keeps undecodable percent-encoded bytes as lone surrogates, which UTF-8 cannot encode.
        if name in TEXT_FIELDS and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _not_utf8(name, "a percent-encoded byte sequence does not decode") from None
    return FormData(pairs)


def _form_values(form: FormData, names: tuple[str, ...]) -> list[str | UploadFile]:
    """The values of any of ``names`` in the order they were sent (``image`` and ``img`` may be mixed)."""
    return [value for name, value in form.multi_items() if name in names]


def _declared_pixels(data: bytes, name: str, max_image_pixels: int) -> int:
    """Pixels a photo's header declares, read without decoding (PIL opens lazily); 0 when it does not open.

    A photo whose header does not open is refused by decoding, with its reason, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeApiError(str(ImageTooLargeError(name, None, max_image_pixels))) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 0
    if pixels > max_image_pixels:
        raise ImageTooLargeApiError(str(ImageTooLargeError(name, pixels, max_image_pixels)))
    return pixels


async def _read_images(form: FormData, settings: ServingSettings) -> list[ImageUpload]:
    uploads = []
    for index, value in enumerate(_form_values(form, IMAGE_FIELDS)):
        if not isinstance(value, UploadFile):
            raise InvalidInputError("the field 'image' must be a file upload (multipart/form-data), not a text value")
        declared = _media_type(value.content_type)
        # Clients that do not know the type send none or octet-stream; the decoder decides then.
        if declared and declared != "application/octet-stream" and not declared.startswith("image/"):
            raise UnsupportedMediaTypeError(f"the file {value.filename or '(unnamed)'!r} is {declared}, not an image")
        data = await value.read()
        name = value.filename or f"#{index}"
        uploads.append(ImageUpload(data, name, _declared_pixels(data, name, settings.max_image_pixels)))
    total = sum(upload.pixels for upload in uploads)
    if total > settings.max_request_pixels:
        raise TooManyPixelsError(f"the photos of this request have {total:,} pixels in all, more than the limit of "
                                 f"{settings.max_request_pixels:,} per request; send fewer or smaller photos")
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


def _check_texts(texts: Iterable[str], settings: ServingSettings) -> None:
    total = sum(len(text) for text in texts)
    if total > settings.max_request_text_chars:
        raise TextTooLongError(f"the texts of this request have {total:,} characters in all, more than the limit "
                               f"of {settings.max_request_text_chars:,} per request")


def _check_count(inputs: PredictInputs, batch: bool, endpoint: str, limit: int) -> PredictInputs:
    """At most ``limit`` photos and texts; a single endpoint answers one listing: its photos, and one text."""
    if not batch and len(inputs.texts) > 1:
        raise InvalidInputError(f"send one text to /{endpoint} (with the listing's photos), or several listings to "
                                f"/{endpoint}/batch; got {len(inputs.texts)} texts")
    for what, count in (("image", len(inputs.images)), ("text", len(inputs.texts))):
        if count > limit:
            raise TooManyInputsError(f"at most {limit} {what}s per request; got {count}")
    return inputs


def _require(inputs: PredictInputs, images: bool, texts: bool, *, either: bool) -> PredictInputs:
    """The fields an endpoint needs; with ``either`` (a single listing of a photo + text model) one of them is
    enough: a listing without a photo, or without a text, still gets an answer."""
    missing_images = images and not inputs.images
    missing_texts = texts and not inputs.texts
    if either and not (missing_images and missing_texts):
        return inputs
    if missing_images:
        raise InvalidInputError("missing the file field 'image' (or 'img')")
    if missing_texts:
        raise InvalidInputError("missing the field 'text' (or 'txt')")
    return inputs


async def _read_form(request: Request, settings: ServingSettings, *, images: bool, texts: bool,
                     either: bool = False) -> PredictInputs:
    media_type = _media_type(request.headers.get("content-type"))
    if media_type not in _FORM_MEDIA_TYPES:
        wanted = "a file field 'image'" + (" and a field 'text'" if texts else "")
        raise UnsupportedMediaTypeError(f"send multipart/form-data with {wanted}; "
                                        f"got {media_type or 'a body without Content-Type'}")
    form = await (_parse_multipart if media_type == _MULTIPART else _parse_urlencoded)(request, settings)
    try:
        inputs = PredictInputs(texts=_read_texts(form) if texts else [])
        _check_texts(inputs.texts, settings)
        if images:
            inputs.images = await _read_images(form, settings)
    finally:
        await form.close()
    return _require(inputs, images, texts, either=either)


def form_inputs(endpoint: str, *, images: bool, texts: bool, batch: bool
                ) -> Callable[[Request, ServingSettings], Awaitable[PredictInputs]]:
    """A dependency reading the photos and/or texts of a form request to ``/<endpoint>[/batch]``."""

    async def read(request: Request, settings: SettingsDep) -> PredictInputs:
        inputs = await _read_form(request, settings, images=images, texts=texts, either=images and texts and not batch)
        return _check_count(inputs, batch, endpoint, settings.max_items_per_request)

    return read


async def _json_texts(request: Request, settings: ServingSettings, endpoint: str, *, batch: bool) -> PredictInputs:
    body = await request.body()
    if batch:
        inputs = PredictInputs(texts=_parse_json(TextBatchRequest, body).texts)
    else:
        inputs = PredictInputs(texts=[_parse_json(TextRequest, body).text])
    _check_count(inputs, batch, endpoint, settings.max_items_per_request)
    _check_texts(inputs.texts, settings)
    return inputs


def form_request_body(*, images: bool, texts: bool, batch: bool, either: bool = False,
                      json_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """The OpenAPI request body of what ``form_inputs`` (or a JSON model) reads: the inputs are read by a
    dependency, so FastAPI cannot infer them. ``either``: a photo or a text is enough (neither field required)."""

    def field(schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "array", "items": schema} if batch else schema

    properties: dict[str, Any] = {}
    if images:
        # A single listing may have several photos: they count together.
        properties["image"] = ({"type": "array", "items": {"type": "string", "format": "binary"},
                                "description": "the listing's photo, or several of its photos ('img' works too)"}
                               if not batch else field({"type": "string", "format": "binary",
                                                        "description": "one photo per listing ('img' works too)"}))
    if texts:
        properties["text"] = field({"type": "string", "description": "the listing text ('txt' works too)"})
    form = {"schema": {"type": "object", "properties": properties, "required": [] if either else list(properties)}}
    content = {"multipart/form-data": form}
    if json_model is not None:
        content["application/json"] = {"schema": json_model.model_json_schema()}
    if not images:
        content["application/x-www-form-urlencoded"] = form
    return {"requestBody": {"required": True, "content": content}}


def text_inputs(*, batch: bool) -> Callable[[Request, ServingSettings], Awaitable[PredictInputs]]:
    """A dependency reading the texts of ``/text[/batch]``: JSON (``{"text": ...}``, ``{"texts": [...]}``) or a form."""

    async def read(request: Request, settings: SettingsDep) -> PredictInputs:
        media_type = _media_type(request.headers.get("content-type"))
        if media_type == _JSON_MEDIA_TYPE:
            return await _json_texts(request, settings, "text", batch=batch)
        if media_type in _FORM_MEDIA_TYPES:
            inputs = await _read_form(request, settings, images=False, texts=True)
            return _check_count(inputs, batch, "text", settings.max_items_per_request)
        example = '{"texts": [...]}' if batch else '{"text": "..."}'
        raise UnsupportedMediaTypeError(f"send application/json {example} or a form with the field 'text'; "
                                        f"got {media_type or 'a body without Content-Type'}")

    return read


async def embed_batch_inputs(request: Request, settings: SettingsDep) -> PredictInputs:
    """The listings of ``/embed/batch``: JSON ``{"texts": [...]}``, or a form of photos ('image') and/or texts where
    the i-th photo and the i-th text are listing i."""
    if _media_type(request.headers.get("content-type")) == _JSON_MEDIA_TYPE:
        return await _json_texts(request, settings, "embed", batch=True)
    inputs = await _read_form(request, settings, images=True, texts=True, either=True)
    return _check_count(inputs, True, "embed", settings.max_items_per_request)


#: Form fields of ``/similar`` besides the photos and the text: ``SimilarRequest``'s other fields.
SIMILAR_FORM_FIELDS = tuple(name for name in SimilarRequest.model_fields if name != "text")


@dataclass
class SimilarInputs:
    """A ``/similar`` or ``/embed`` request: the photos (still encoded) and the checked query fields."""

    query: SimilarRequest
    images: list[ImageUpload] = field(default_factory=list)


def _form_query(form: FormData, texts: list[str]) -> SimilarRequest:
    values: dict[str, Any] = {}
    for name in SIMILAR_FORM_FIELDS:
        sent = _form_values(form, (name,))
        if len(sent) > 1:
            raise InvalidInputError(f"send the field {name!r} once; got it {len(sent)} times")
        if sent:
            if not isinstance(sent[0], str):
                raise InvalidInputError(f"the field {name!r} must be a text value, not a file")
            values[name] = sent[0]
    if texts:
        values["text"] = texts[0]
    try:
        return SimilarRequest.model_validate(values)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from exc


async def similar_inputs(request: Request, settings: SettingsDep) -> SimilarInputs:
    """The query of ``/similar`` and ``/embed``: JSON (``SimilarRequest``), or a form with photos ('image'), a text
    and the same fields; held to the same limits as the prediction endpoints. At least one of a listing id, a photo
    or a text; a listing id goes alone."""
    media_type = _media_type(request.headers.get("content-type"))
    if media_type == _JSON_MEDIA_TYPE:
        inputs = SimilarInputs(_parse_json(SimilarRequest, await request.body()))
    elif media_type in _FORM_MEDIA_TYPES:
        form = await (_parse_multipart if media_type == _MULTIPART else _parse_urlencoded)(request, settings)
        try:
            texts = _read_texts(form)
            if len(texts) > 1:
                raise InvalidInputError(f"send one text (the listing's); got {len(texts)} texts")
            inputs = SimilarInputs(_form_query(form, texts), await _read_images(form, settings))
        finally:
            await form.close()
        if len(inputs.images) > settings.max_items_per_request:
            raise TooManyInputsError(f"at most {settings.max_items_per_request} images per request; "
                                     f"got {len(inputs.images)}")
    else:
        raise UnsupportedMediaTypeError('send application/json {"listing_id": ...} or {"text": ...}, or '
                                        "multipart/form-data with photos ('image') and/or a field 'text'; "
                                        f"got {media_type or 'a body without Content-Type'}")
    query = inputs.query
    if query.text is not None:
        _check_texts([query.text], settings)
    if query.listing_id is not None and (query.text is not None or inputs.images):
        raise InvalidInputError("give either a listing_id or photos and/or a text, not both")
    if query.listing_id is None and query.text is None and not inputs.images:
        raise InvalidInputError("nothing to search with: give a listing_id, photos ('image') and/or a text")
    return inputs

"""The models a server answers with: loaded by name in the background at start-up, warmed up, micro-batched.

Loading in the background keeps ``/health`` answering while large checkpoints load or download;
``/ready`` says 503 until every configured model is loaded and warmed up.

Each prediction has a deadline (``inference_timeout_s``: 503 ``inference_timeout``) and is refused at once
when its model's queue is full (503 ``overloaded``). Photos are decoded by one thread per usable core, once
the request holds its share of ``max_pixels_in_flight``, which it keeps until its answer is ready: so the
decoded photos held at once stay within that budget (``settings.py`` has the arithmetic).

After a burst of photos, glibc keeps the memory they took: freed, but held by the process, in the heaps of
the threads that decoded them. Measured over 30 batch requests of 12- to 36-megapixel photos, 8 at a time, on
a server with a tiny model: RSS 3.3 to 3.75 times its warmed-up size afterwards, 3.1 with MALLOC_ARENA_MAX=2,
1.24 with a fixed MALLOC_MMAP_THRESHOLD_ of 1 MiB. So once no request holds decoded pixels any more, after at
least ``_TRIM_AFTER_PIXELS`` since the last time, the pool asks glibc to give freed memory back
(``malloc_trim``): 1.01 to 1.08 times after the same burst, and 1.08 after scripts/bench_reliability.py's
2,000 requests.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
from PIL import Image
from sqlalchemy import Engine

from ..data.database import open_engine
from ..data.errors import CorruptImageError, ImageTooLargeError
from ..search import ListingIndex
from ..search.build import load_index
from .batching import BatcherFullError, MicroBatcher
from .errors import (
    RETRY_AFTER_S,
    BadImageError,
    ImageTooLargeApiError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelNotReadyError,
    ModelOutputInvalidError,
    NoModelError,
    OverloadedError,
)
from .metrics import Metrics
from .predictor import ModelOutputError, Predictor, PredictorInputError
from .schemas import Prediction
from .settings import ServingSettings

logger = logging.getLogger(__name__)

#: Which classifier input kind answers each prediction endpoint.
ENDPOINT_INPUT_KINDS = {"image": "image", "text": "text", "combined": "image+text"}
_WARMUP_IMAGE_SIZE = (224, 224)
#: Decoded pixels (4 bytes each) after which memory is given back once requests hold none: 64 MB.
_TRIM_AFTER_PIXELS = 16_000_000
#: glibc's malloc_trim; None elsewhere (musl, macOS), where there is nothing to do.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)

T = TypeVar("T")
R = TypeVar("R")

# One listing: its decoded photos (none for a text) and its text (None without one).
_Item = tuple[tuple[Image.Image, ...], str | None]


@dataclass(frozen=True)
class ImageUpload:
    """An uploaded photo, still encoded: ``name`` names it in error messages, ``pixels`` its header declares."""

    data: bytes
    name: str
    pixels: int


@dataclass(frozen=True)
class _ServedModel:
    predictor: Predictor
    batcher: MicroBatcher[_Item, Prediction]
    #: Micro-batches ``embed`` calls (/similar, /embed); None for a model without listing vectors.
    embedder: MicroBatcher[_Item, np.ndarray] | None = None


def _predict_items(predictor: Predictor, items: list[_Item]) -> list[Prediction]:
    """The batch function: one model call on listings (photos, text) already checked and decoded."""
    return predictor.predict_decoded([list(photos) for photos, _ in items],
                                     [text for _, text in items] if predictor.takes_texts else None)


def _embed_items(predictor: Predictor, items: list[_Item]) -> list[np.ndarray]:
    """The embedding batch function: one ``embed`` call on listings already checked and decoded."""
    vectors = predictor.embed_decoded([list(photos) for photos, _ in items],
                                      [text for _, text in items] if predictor.takes_texts else None)
    return list(vectors)


def _checked_listings(predictor: Predictor, endpoint: str, images: Sequence[ImageUpload], texts: Sequence[str], *,
                      batch: bool) -> tuple[list[list[ImageUpload]], list[str | None]]:
    """The listings of a request, checked against what ``predictor`` takes: a single request's photos are one
    listing's; a batch's i-th photo is listing i, with the i-th text. The texts are padded with None for the
    listings without one (all None for a model that reads no text)."""
    if batch and images and texts and len(images) != len(texts):
        raise InvalidInputError(f"{endpoint}/batch pairs the i-th photo with the i-th text; got {len(images)} "
                                f"photos and {len(texts)} texts")
    listings = [[upload] for upload in images] if batch else [list(images)] if images else []
    n = max(len(listings), len(texts))
    listings += [[] for _ in range(n - len(listings))]  # listings with a text and no photo
    padded: list[str | None] = [*texts, *[None] * (n - len(texts))]
    try:
        predictor.check_listings([len(photos) for photos in listings], padded if texts else None)
    except PredictorInputError as exc:
        raise InvalidInputError(str(exc)) from exc
    return listings, padded if predictor.takes_texts else [None] * n


def _decode(predictor: Predictor, uploads: Sequence[ImageUpload]) -> list[Image.Image]:
    images = []
    for upload in uploads:
        try:
            images.append(predictor.load_image(upload.data, name=upload.name))
        except CorruptImageError as exc:
            raise BadImageError(str(exc)) from exc
        except ImageTooLargeError as exc:
            raise ImageTooLargeApiError(str(exc)) from exc
    return images


class PixelBudget:
    """Decoded pixels that requests may hold at once; a request waits for its share, first come first served."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        # One request at a time waits for room, in arrival order: small requests cannot overtake a large one forever.
        self._turn = asyncio.Lock()
        self._freed = asyncio.Event()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold ``pixels`` (at most ``total``) of the budget for the ``async with`` block."""
        async with self._turn:
            while self.held + pixels > self.total:
                self._freed.clear()
                await self._freed.wait()
            self.held += pixels
        try:
            yield
        finally:
            self.held -= pixels
            self._freed.set()


class ModelPool:
    """Owns the predictors, their micro-batchers and the inference threads of one app."""

    def __init__(self, settings: ServingSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        configured = settings.endpoint_models()
        #: endpoint ("image", "text", "combined") -> model name
        self.endpoints = {endpoint: name for endpoint, (name, _) in configured.items()}
        self._revisions: dict[str, str | None] = {}
        for name, revision in configured.values():
            if self._revisions.get(name, revision) != revision:
                raise ValueError(
                    f"model {name!r} is configured with two revisions: {self._revisions[name]!r}, {revision!r}")
            self._revisions[name] = revision
        for name in settings.extra_models:
            self._revisions.setdefault(name, None)
        #: model name -> "loading", "ready" or "failed: <reason>"
        self.status = {name: "loading" for name in self._revisions}
        self._served: dict[str, _ServedModel] = {}
        # One batch per model at a time: one thread per model is all the parallelism inference gets.
        self._executor = ThreadPoolExecutor(max_workers=max(1, len(self._revisions)), thread_name_prefix="inference")
        # Decoding is CPU-bound: more threads than cores would only hold more half-decoded photos in memory.
        self._decoder = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="decode")
        self._pixels = PixelBudget(settings.max_pixels_in_flight)
        #: The listing index behind /similar (None until loaded, or when none is configured) and the database
        #: its listings' details come from.
        self.index: ListingIndex | None = None
        self.index_status_key = f"index {settings.index}" if settings.index else None
        if self.index_status_key is not None:
            self.status[self.index_status_key] = "loading"
        self.engine: Engine | None = None
        # Searches block (FAISS computes, pgvector waits on SQL): a few threads of their own, off the event loop.
        self._searcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search")
        self._pixels_since_trim = 0
        self._loader: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return all(status == "ready" for status in self.status.values())

    def start(self) -> None:
        """Begin loading every configured model in the background."""
        self._loader = asyncio.create_task(self._load_all())

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        for served in self._served.values():
            await served.batcher.stop()
            if served.embedder is not None:
                await served.embedder.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._searcher.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.dispose()

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        for name, revision in self._revisions.items():
            try:
                predictor = await loop.run_in_executor(self._executor, self._load, name, revision)
            except Exception as exc:
                logger.exception("cannot load model %r", name)
                self.status[name] = f"failed: {exc}"
                continue
            batcher: MicroBatcher[_Item, Prediction] = self._started_batcher(partial(_predict_items, predictor), name)
            embedder: MicroBatcher[_Item, np.ndarray] | None = (
                self._started_batcher(partial(_embed_items, predictor), name) if predictor.embeds else None)
            self._served[name] = _ServedModel(predictor, batcher, embedder)
            self.status[name] = "ready"
            logger.info("model %r (%s, revision %s) is ready", name, predictor.model.model_type, predictor.revision)
        if self.index_status_key is not None:
            await self._load_index(loop)

    def _started_batcher(self, process: Callable[[list[_Item]], Sequence[R]], name: str) -> MicroBatcher[_Item, R]:
        """A running micro-batcher of ``process`` with the server's batch limits, its batches counted for ``name``."""
        batcher: MicroBatcher[_Item, R] = MicroBatcher(
            process,
            executor=self._executor,
            max_batch_size=self._settings.max_batch_size,
            max_wait_s=self._settings.max_batch_wait_ms / 1000,
            max_queued=self._settings.max_queued_inputs,
            on_batch=partial(self._metrics.observe_batch, name),
        )
        batcher.start()
        return batcher

    async def _load_index(self, loop: asyncio.AbstractEventLoop) -> None:
        settings = self._settings
        try:
            self.engine = open_engine(settings.db_url)
            self.index = await loop.run_in_executor(
                self._searcher, partial(load_index, settings.index, db_url=settings.db_url,
                                        revision=settings.index_revision))
        except Exception as exc:
            logger.exception("cannot load the listing index %r", settings.index)
            self.status[self.index_status_key] = f"failed: {exc}"  # type: ignore[index]
            return
        self.status[self.index_status_key] = "ready"  # type: ignore[index]
        logger.info("listing index %r (%d listings of model %r) is ready", settings.index, len(self.index),
                    self.index.embedding.model_name)

    @property
    def index_name(self) -> str:
        """The configured listing index (``MARKETPLACE_INDEX``), as configured; empty without one."""
        return self._settings.index or ""

    def similar_model(self) -> str:
        """The served model that embeds /similar queries: ``similar_model``, or the index's model."""
        if self.index is None:
            if self.index_status_key is None:
                raise NoModelError("this server has no listing index behind /similar (set MARKETPLACE_INDEX)")
            raise ModelNotReadyError(f"the listing index {self.index_name!r} is not ready: "
                                     f"{self.status[self.index_status_key]}")
        return self._settings.similar_model or self.index.embedding.model_name

    def check_similar_model(self, predictor: Predictor) -> None:
        """``ModelMismatchError`` unless ``predictor`` is the model revision that built the index. A model served
        under the index's own name must match name and revision; one named by ``similar_model`` (e.g. the same
        checkpoint served under another name) must match the revision, which identifies a checkpoint's content."""
        assert self.index is not None
        name = self.index.embedding.model_name if self._settings.similar_model else predictor.name
        self.index.check_model(name, predictor.revision)

    async def run_search(self, function: Callable[[], T]) -> T:
        """Run a blocking index or database call off the event loop, within the request deadline."""
        timeout_s = self._settings.inference_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.get_running_loop().run_in_executor(self._searcher, function)
        except TimeoutError:
            raise InferenceTimeoutError(timeout_s) from None

    def _load(self, name: str, revision: str | None) -> Predictor:
        predictor = Predictor.from_pretrained(name, revision, max_image_pixels=self._settings.max_image_pixels,
                                              quantization=self._settings.quantization)
        expected = [endpoint for endpoint, served_name in self.endpoints.items() if served_name == name]
        for endpoint in expected:
            if predictor.input_kind != ENDPOINT_INPUT_KINDS[endpoint]:
                raise ValueError(f"/{endpoint} needs a model of input kind {ENDPOINT_INPUT_KINDS[endpoint]!r}, "
                                 f"but {name!r} is {predictor.input_kind!r}")
        if self._settings.warmup:
            # The first call of a torch model is slow (allocations, kernel selection): pay it before going ready.
            photos = (Image.new("RGB", _WARMUP_IMAGE_SIZE, (127, 127, 127)),) if predictor.takes_images else ()
            _predict_items(predictor, [(photos, "warm up")])
        return predictor

    def predictors(self) -> list[Predictor]:
        """The loaded models, in configuration order."""
        return [self._served[name].predictor for name in self._revisions if name in self._served]

    def endpoints_of(self, name: str) -> list[str]:
        """The prediction endpoints a model answers by default."""
        return [f"/{endpoint}" for endpoint, served_name in self.endpoints.items() if served_name == name]

    def predictor(self, name: str) -> Predictor:
        """A loaded model by name: 404 if this server does not serve it, 503 while it is not loaded."""
        return self._served_model(name).predictor

    def _served_model(self, name: str) -> _ServedModel:
        if name in self._served:
            return self._served[name]
        if name in self.status:
            raise ModelNotReadyError(f"model {name!r} is not ready: {self.status[name]}")
        served = ", ".join(repr(known) for known in self.status if known != self.index_status_key) or "none"
        raise NoModelError(f"no model {name!r} on this server; it serves: {served}")

    async def predict(self, endpoint: str, images: Sequence[ImageUpload], texts: Sequence[str], *, batch: bool,
                      model: str | None = None) -> list[Prediction]:
        """Answer a prediction endpoint: check the inputs, decode photos off the event loop, batch, predict.

        A single endpoint answers one listing: every photo sent is one of its photos. A batch endpoint answers
        one listing per photo (and, for /combined/batch, the photo with the text of the same position).
        """
        name = model if model is not None else self.endpoints.get(endpoint)
        if name is None:
            raise NoModelError(f"this server has no {endpoint} model (set MARKETPLACE_{endpoint.upper()}_MODEL)")
        served = self._served_model(name)
        if served.predictor.input_kind != ENDPOINT_INPUT_KINDS[endpoint]:
            raise InvalidInputError(f"model {name!r} takes {served.predictor.input_kind!r} inputs, "
                                    f"not what /{endpoint} sends ({ENDPOINT_INPUT_KINDS[endpoint]!r})")
        listings, listed_texts = _checked_listings(served.predictor, f"/{endpoint}", images, texts, batch=batch)
        return await self._guarded(name, served.batcher, served.predictor, listings, listed_texts)

    async def embed(self, name: str, images: Sequence[ImageUpload], texts: Sequence[str], *, batch: bool
                    ) -> tuple[Predictor, np.ndarray]:
        """Unit vectors (``[listings, dim]``) from model ``name``: one listing's photos and/or its text, or with
        ``batch`` one listing per photo and/or text (the i-th photo with the i-th text); checked, decoded and
        micro-batched as predictions are."""
        served = self._served_model(name)
        predictor = served.predictor
        if served.embedder is None:
            raise InvalidInputError(f"model {name!r} ({predictor.model.model_type}) gives no listing vectors; "
                                    "ask a torch model (image-classifier, text-cnn, text-transformer, fusion)")
        listings, listed_texts = _checked_listings(predictor, "/embed", images, texts, batch=batch)
        return predictor, np.stack(await self._guarded(name, served.embedder, predictor, listings, listed_texts))

    async def _guarded(self, name: str, batcher: MicroBatcher[_Item, R], predictor: Predictor,
                       listings: list[list[ImageUpload]], texts: list[str | None]) -> list[R]:
        """Submit checked listings within the deadline; a full queue, a timeout or a broken output as API errors."""
        timeout_s = self._settings.inference_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._predict(batcher, predictor, listings, texts)
        except TimeoutError:
            raise InferenceTimeoutError(timeout_s) from None
        except BatcherFullError as exc:
            raise OverloadedError(f"model {name!r} is busy ({exc}); try again in {RETRY_AFTER_S} s") from None
        except ModelOutputError as exc:
            logger.error("refused to answer: %s", exc)
            raise ModelOutputInvalidError(str(exc)) from None

    async def _predict(self, batcher: MicroBatcher[_Item, R], predictor: Predictor,
                       listings: list[list[ImageUpload]], texts: list[str | None]) -> list[R]:
        # Refused before anything is decoded when the queue is full already; submit_many checks again.
        batcher.check_room(len(listings))
        uploads = [upload for photos in listings for upload in photos]
        if not uploads:
            return await batcher.submit_many([((), text) for text in texts])
        pixels = sum(upload.pixels for upload in uploads)
        try:
            async with self._pixels.hold(pixels):
                return await self._decode_and_submit(batcher, predictor, listings, texts)
        finally:  # the decoded photos went with _decode_and_submit's frame
            self._give_memory_back_after(pixels)

    async def _decode_and_submit(self, batcher: MicroBatcher[_Item, R], predictor: Predictor,
                                 listings: list[list[ImageUpload]], texts: Sequence[str | None]) -> list[R]:
        loop = asyncio.get_running_loop()
        uploads = [upload for photos in listings for upload in photos]
        decoded = iter(await loop.run_in_executor(self._decoder, _decode, predictor, uploads))
        items = [(tuple(next(decoded) for _ in photos), text) for photos, text in zip(listings, texts, strict=True)]
        return await batcher.submit_many(items)

    def _give_memory_back_after(self, pixels: int) -> None:
        """Have glibc return freed memory to the system once no request holds decoded pixels (module docstring)."""
        self._pixels_since_trim += pixels
        if _MALLOC_TRIM is None or self._pixels.held or self._pixels_since_trim < _TRIM_AFTER_PIXELS:
            return
        self._pixels_since_trim = 0
        asyncio.get_running_loop().run_in_executor(self._decoder, _MALLOC_TRIM, 0)

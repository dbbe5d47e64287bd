"""The models a server answers with: loaded by name in the background at start-up, warmed up, micro-batched.

Loading in the background keeps ``/health`` answering while large checkpoints load or download;
``/ready`` says 503 until every configured model is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..data.errors import CorruptImageError, ImageTooLargeError
from .batching import MicroBatcher
from .errors import BadImageError, ImageTooLargeApiError, InvalidInputError, ModelNotReadyError, NoModelError
from .metrics import Metrics
from .predictor import Predictor, PredictorInputError
from .schemas import Prediction
from .settings import ServingSettings

logger = logging.getLogger(__name__)

#: Which classifier input kind answers each prediction endpoint.
ENDPOINT_INPUT_KINDS = {"image": "image", "text": "text", "combined": "image+text"}
_WARMUP_IMAGE_SIZE = (224, 224)

_Item = tuple[Image.Image | None, str | None]


@dataclass(frozen=True)
class ImageUpload:
    """An uploaded photo, still encoded; ``filename`` names it in error messages."""

    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class _ServedModel:
    predictor: Predictor
    batcher: MicroBatcher[_Item, Prediction]


def _predict_items(predictor: Predictor, items: list[_Item]) -> list[Prediction]:
    """The batch function: one model call on (image, text) pairs already checked and decoded."""
    images = [image for image, _ in items] if predictor.takes_images else None
    texts = [text for _, text in items] if predictor.takes_texts else None
    return predictor.predict_decoded(images, texts)  # type: ignore[arg-type]  # checked in predict()


def _decode(predictor: Predictor, uploads: Sequence[ImageUpload]) -> list[Image.Image]:
    images = []
    for index, upload in enumerate(uploads):
        try:
            images.append(predictor.load_image(upload.data, name=upload.filename or f"#{index}"))
        except CorruptImageError as exc:
            raise BadImageError(str(exc)) from exc
        except ImageTooLargeError as exc:
            raise ImageTooLargeApiError(str(exc)) from exc
    return images


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
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        for name, revision in self._revisions.items():
            try:
                predictor = await loop.run_in_executor(self._executor, self._load, name, revision)
            except Exception as exc:
                logger.exception("cannot load model %r", name)
                self.status[name] = f"failed: {exc}"
                continue
            batcher: MicroBatcher[_Item, Prediction] = MicroBatcher(
                partial(_predict_items, predictor),
                executor=self._executor,
                max_batch_size=self._settings.max_batch_size,
                max_wait_s=self._settings.max_batch_wait_ms / 1000,
                on_batch=partial(self._metrics.observe_batch, name),
            )
            batcher.start()
            self._served[name] = _ServedModel(predictor, batcher)
            self.status[name] = "ready"
            logger.info("model %r (%s, revision %s) is ready", name, predictor.model.model_type, predictor.revision)

    def _load(self, name: str, revision: str | None) -> Predictor:
        predictor = Predictor.from_pretrained(name, revision, max_image_pixels=self._settings.max_image_pixels)
        expected = [endpoint for endpoint, served_name in self.endpoints.items() if served_name == name]
        for endpoint in expected:
            if predictor.input_kind != ENDPOINT_INPUT_KINDS[endpoint]:
                raise ValueError(f"/{endpoint} needs a model of input kind {ENDPOINT_INPUT_KINDS[endpoint]!r}, "
                                 f"but {name!r} is {predictor.input_kind!r}")
        if self._settings.warmup:
            # The first call of a torch model is slow (allocations, kernel selection): pay it before going ready.
            image = Image.new("RGB", _WARMUP_IMAGE_SIZE, (127, 127, 127))
            _predict_items(predictor, [(image, "warm up")])
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
        served = ", ".join(repr(known) for known in self.status) or "none"
        raise NoModelError(f"no model {name!r} on this server; it serves: {served}")

    async def predict(self, endpoint: str, images: Sequence[ImageUpload], texts: Sequence[str],
                      model: str | None = None) -> list[Prediction]:
        """Answer a prediction endpoint: check the inputs, decode photos off the event loop, batch, predict."""
        name = model or self.endpoints.get(endpoint)
        if name is None:
            raise NoModelError(f"this server has no {endpoint} model (set MARKETPLACE_{endpoint.upper()}_MODEL)")
        served = self._served_model(name)
        predictor = served.predictor
        if predictor.input_kind != ENDPOINT_INPUT_KINDS[endpoint]:
            raise InvalidInputError(f"model {name!r} takes {predictor.input_kind!r} inputs, "
                                    f"not what /{endpoint} sends ({ENDPOINT_INPUT_KINDS[endpoint]!r})")
        try:
            predictor.check_inputs(len(images), texts or None)
        except PredictorInputError as exc:
            raise InvalidInputError(str(exc)) from exc
        count = max(len(images), len(texts))
        decoded: list[Image.Image | None] = (
            list(await run_in_threadpool(_decode, predictor, images)) if images else [None] * count)
        return await served.batcher.submit_many(list(zip(decoded, texts or [None] * count, strict=True)))

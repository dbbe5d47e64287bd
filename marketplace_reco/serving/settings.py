"""Serving settings, read from ``MARKETPLACE_*`` environment variables (pydantic-settings).

Models are named exactly as in Python (``load_model``): a checkpoint name under the checkpoints folder
(``MARKETPLACE_CHECKPOINTS``, see ``marketplace_reco.settings``), a folder, an ``s3://`` location or a
Hugging Face repo id. An endpoint whose model is not set answers 404.

Memory per request is bounded before anything is decoded, and the defaults fit a 24 GiB machine. A decoded
photo takes 4 bytes per pixel (PIL keeps RGB in 32-bit pixels) from decoding until its model call ends; while
one is being decoded its conversions take up to 20 bytes per pixel more (measured: a transparent PNG is
decoded as RGBA, composited onto a white RGBA page and converted; a 16-bit PNG goes through float arrays). So:

- decoded photos held at once: at most ``max_pixels_in_flight`` = 2,000,000,000 pixels x 4 B = 7.5 GiB,
  that is 20 requests of the largest size (``max_request_pixels`` = 100,000,000, five 20-megapixel photos)
  at once, or any number of smaller ones; a request waits for its share, within its deadline;
- photos being decoded: one per decoding thread (one thread per usable core), at most 40,000,000 pixels
  (``max_image_pixels``) x 20 B = 0.75 GiB each, so 6 GiB even on 8 cores;
- bodies being read: at most 20 MiB each (``max_body_bytes``); 100 full-size uploads at once are 2 GiB;
- texts: ``max_request_text_chars`` = 100,000 characters take at most 0.4 MB as a Python string and about
  0.1 s of the model's thread to tokenise, so one request cannot stall the others for long;
- the process itself with its models: 1 to 2 GiB.

That is at most about 17.5 GiB; memory freed after a burst goes back to the system (see ``pool.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..models import check_quantization

#: Shorter keys could be guessed; ``python -c "import secrets; print(secrets.token_urlsafe(32))"`` makes one.
MIN_API_KEY_LENGTH = 16


class ServingSettings(BaseSettings):
    """Everything the HTTP service can be told; every field is ``MARKETPLACE_<FIELD>`` in the environment."""

    # Input values never appear in validation errors: they could be API keys.
    model_config = SettingsConfigDict(env_prefix="MARKETPLACE_", extra="ignore", protected_namespaces=(),
                                      hide_input_in_errors=True)

    image_model: str | None = Field(None, description="model behind /image (input kind 'image')")
    image_model_revision: str | None = None
    text_model: str | None = Field(None, description="model behind /text (input kind 'text')")
    text_model_revision: str | None = None
    combined_model: str | None = Field(None, description="model behind /combined (input kind 'image+text')")
    combined_model_revision: str | None = None
    extra_models: list[str] = Field(
        default_factory=list,
        description="more models to load (JSON list in the environment); they answer the endpoint of their "
                    "input kind when asked by name: POST /image?model=<name>",
    )

    index: str | None = Field(
        None, description="listing index behind /similar: a FAISS index (name under the checkpoints folder, folder, "
                          "s3:// or hub repo id) or pgvector:<table> in the db_url database")
    index_revision: str | None = None
    similar_model: str | None = Field(
        None, description="served model that embeds /similar and /embed queries (default: the index's model, "
                          "which must then be served: an endpoint model or one of extra_models)")
    db_url: str | None = Field(None, description="marketplace database the index's listings are read from "
                                                 "(default: marketplace_reco.settings.default_db_url())")

    host: str = "127.0.0.1"
    port: int = Field(8008, ge=0, le=65535)

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body, checked while reading")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard, per image")
    max_request_pixels: int = Field(
        100_000_000, ge=1, description="most pixels of all the photos of one request, read from their headers "
                                       "before any is decoded")
    max_pixels_in_flight: int = Field(
        2_000_000_000, ge=1, description="most decoded pixels all requests hold at once; a request waits for "
                                         "its share (within --inference-timeout-s)")
    max_request_text_chars: int = Field(
        100_000, ge=1, description="most characters of all the texts of one request, JSON or form")
    max_items_per_request: int = Field(64, ge=1, description="most images or texts in one batch request")
    max_batch_size: int = Field(32, ge=1, description="most inputs one model call takes (micro-batching)")
    max_batch_wait_ms: float = Field(2.0, ge=0, description="how long a micro-batch waits to fill up")
    max_queued_inputs: int = Field(
        256, ge=1, description="most inputs waiting for one model; beyond, requests are refused at once with "
                               "503 and Retry-After (load shedding)")
    inference_timeout_s: float = Field(
        30.0, gt=0, description="deadline of a prediction (waiting, decoding, queueing, model call): 503 after it")
    header_timeout_s: float = Field(
        10.0, gt=0, description="time a connection has to send a request's line and headers, from its first "
                                "byte (or from connecting)")
    body_timeout_s: float = Field(
        60.0, gt=0, description="time a request has to send its whole body once its headers are in")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle time before a keep-alive connection is closed")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="keys a client must send (Authorization: Bearer <key> or X-API-Key: <key>); comma-separated "
                    "or a JSON list; none: no key needed",
    )
    api_keys_file: Path | None = Field(None, description="a file of API keys, one per line ('#' starts a comment)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; default: every usable core"
    )
    warmup: bool = Field(True, description="run one prediction per model before reporting ready")
    quantization: str | None = Field(
        None, description="int8: run a text transformer's feed-forward expansions with int8 weights (dynamic "
                          "quantization; photo models and the text CNN are served as they are): /text p50 34.2 -> "
                          "28.6 ms on two cores at the same accuracy on the real listings; answers are close to, not "
                          "exactly, the float model's: check them with scripts/evaluate.py --quantization int8 first")

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _empty_means_no_file(cls, value: Any) -> Any:
        # MARKETPLACE_API_KEYS_FILE= (empty) turns off a file the environment names, e.g. the Docker image's.
        return None if value == "" else value

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, value: str | None) -> str | None:
        if value is not None:
            check_quantization(value)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        return [key.strip() for key in value if key.strip()] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check_limits(self) -> ServingSettings:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"max_request_pixels ({self.max_request_pixels:,}) must be at least max_image_pixels "
                             f"({self.max_image_pixels:,}): a request of one largest photo must be possible")
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(f"max_pixels_in_flight ({self.max_pixels_in_flight:,}) must be at least "
                             f"max_request_pixels ({self.max_request_pixels:,}): the largest request must fit")
        if self.max_queued_inputs < self.max_items_per_request:
            raise ValueError(f"max_queued_inputs ({self.max_queued_inputs}) must be at least max_items_per_request "
                             f"({self.max_items_per_request}): a full batch request must fit in the queue")
        return self

    def endpoint_models(self) -> dict[str, tuple[str, str | None]]:
        """The configured model of each endpoint kind ("image", "text", "combined"): (name, revision)."""
        configured = {
            "image": (self.image_model, self.image_model_revision),
            "text": (self.text_model, self.text_model_revision),
            "combined": (self.combined_model, self.combined_model_revision),
        }
        return {kind: (name, revision) for kind, (name, revision) in configured.items() if name}

    def accepted_api_keys(self) -> list[SecretStr]:
        """``api_keys`` and the keys of ``api_keys_file``; ``ValueError`` (never showing a key) for a bad one."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read the API keys file {self.api_keys_file} (MARKETPLACE_API_KEYS_FILE): "
                                 f"{exc}") from exc
            keys += [SecretStr(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"the API keys file {self.api_keys_file} holds no key")
        short = sum(len(key.get_secret_value()) < MIN_API_KEY_LENGTH for key in keys)
        if short:
            raise ValueError(f"{short} of the {len(keys)} API keys are shorter than {MIN_API_KEY_LENGTH} characters; "
                             "make long random ones: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        return keys

    def resolved_torch_threads(self) -> int:
        """``torch_threads``, or the usable cores (affinity aware, unlike cpu_count).

        Measured on an idle 2-core machine (scripts/bench_serving.py): 2 torch threads serve more than 1 on
        every endpoint, the event loop sharing a core with torch: ResNet-50 photos 18.6 against 12.2 req/s,
        the demo's small models 392 against 296 (/image) and 644 against 592 (/text). Set 1 on a machine whose
        cores other processes keep busy: there, threads waiting for each other slow every request.
        """
        return self.torch_threads or len(os.sched_getaffinity(0))

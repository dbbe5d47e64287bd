"""Serving settings, read from ``MARKETPLACE_*`` environment variables (pydantic-settings).

Models are named exactly as in Python (``load_model``): a checkpoint name under the checkpoints folder
(``MARKETPLACE_CHECKPOINTS``, see ``marketplace_reco.settings``), a folder, an ``s3://`` location or a
Hugging Face repo id. An endpoint whose model is not set answers 404.
"""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    """Everything the HTTP service can be told; every field is ``MARKETPLACE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MARKETPLACE_", extra="ignore", protected_namespaces=())

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

    host: str = "127.0.0.1"
    port: int = Field(8008, ge=0, le=65535)

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body, checked while reading")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard, per image")
    max_items_per_request: int = Field(64, ge=1, description="most images or texts in one batch request")
    max_batch_size: int = Field(32, ge=1, description="most inputs one model call takes (micro-batching)")
    max_batch_wait_ms: float = Field(2.0, ge=0, description="how long a micro-batch waits to fill up")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; default: every usable core"
    )
    warmup: bool = Field(True, description="run one prediction per model before reporting ready")

    def endpoint_models(self) -> dict[str, tuple[str, str | None]]:
        """The configured model of each endpoint kind ("image", "text", "combined"): (name, revision)."""
        configured = {
            "image": (self.image_model, self.image_model_revision),
            "text": (self.text_model, self.text_model_revision),
            "combined": (self.combined_model, self.combined_model_revision),
        }
        return {kind: (name, revision) for kind, (name, revision) in configured.items() if name}

    def resolved_torch_threads(self) -> int:
        """``torch_threads``, or the usable cores (affinity aware, unlike cpu_count).

        Measured on an idle 2-core machine (scripts/bench_serving.py): 2 torch threads serve more than 1 on
        every endpoint, the event loop sharing a core with torch: ResNet-50 photos 18.6 against 12.2 req/s,
        the demo's small models 392 against 296 (/image) and 644 against 592 (/text). Set 1 on a machine whose
        cores other processes keep busy: there, threads waiting for each other slow every request.
        """
        return self.torch_threads or len(os.sched_getaffinity(0))

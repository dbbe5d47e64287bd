"""Render a checkpoint's README.md from the package's model card template (``model_card.md``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Protocol

import jinja2

_TEMPLATE = "model_card.md"
# The card tabulates these metrics; anything else a training run recorded is shown as JSON below the tables.
_TABULATED_METRICS = ("split", "n_samples", "unit", "accuracy", "macro_f1", "ece", "per_class", "confusion_matrix")
_UNTABULATED_CONFIG = ("model_type", "format_version", "metrics", "data_summary", "classes", "preprocessing")


class CardSubject(Protocol):
    """What a card describes: any checkpoint model (``CheckpointMixin``)."""

    model_type: str
    description: str
    input_kind: str
    metrics: dict[str, Any]
    data_summary: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]: ...


def render_model_card(model: CardSubject) -> str:
    """Fill the model card template with the model's config, classes, metrics and data summary."""
    template = resources.files(__package__).joinpath(_TEMPLATE).read_text(encoding="utf-8")
    config = model.config
    hyperparameters = {key: value for key, value in config.items() if key not in _UNTABULATED_CONFIG}
    other_metrics = {key: value for key, value in model.metrics.items() if key not in _TABULATED_METRICS}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["json"] = lambda value: json.dumps(value, indent=2, sort_keys=True, default=str)
    return env.from_string(template).render(
        model_type=model.model_type,
        description=model.description,
        input_kind=model.input_kind or "none (not a classifier)",
        classes=config.get("classes") or [],
        preprocessing=config.get("preprocessing") or {},
        hyperparameters=hyperparameters,
        metrics=model.metrics,
        other_metrics=other_metrics,
        data_summary=model.data_summary,
        format_version=config["format_version"],
    )

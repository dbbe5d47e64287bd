"""Render a checkpoint's README.md from the template in ``model_cards/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from .errors import CheckpointError

if TYPE_CHECKING:
    from .checkpoint import CheckpointMixin


def render_model_card(model: CheckpointMixin, template_path: Path) -> str:
    """Fill the model card template with the model's config, classes, metrics and data summary."""
    try:
        template = template_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{template_path}: model card template unreadable ({exc})") from exc
    config = model.config
    hyperparameters = {
        key: value
        for key, value in config.items()
        if key not in ("model_type", "format_version", "metrics", "data_summary", "classes", "preprocessing")
    }
    # The card tabulates these; anything else a training run recorded is shown as JSON below the tables.
    tabulated = ("split", "n_samples", "unit", "accuracy", "macro_f1", "per_class", "confusion_matrix")
    other_metrics = {key: value for key, value in model.metrics.items() if key not in tabulated}
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

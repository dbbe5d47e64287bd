"""Model registry and factory, timm style: every model family registers under a type name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ._checkpoint import CheckpointMixin
from ._format import CONFIG_FILE, read_config
from ._hub import resolve_checkpoint
from .errors import UnknownModelTypeError

_MODEL_REGISTRY: dict[str, type[CheckpointMixin]] = {}

C = TypeVar("C", bound=type[CheckpointMixin])


def register_model(model_type: str) -> Callable[[C], C]:
    """Class decorator: make ``model_type`` creatable and loadable through the factory."""

    def _register(cls: C) -> C:
        if model_type in _MODEL_REGISTRY and _MODEL_REGISTRY[model_type] is not cls:
            raise ValueError(f"model type {model_type!r} is already registered by {_MODEL_REGISTRY[model_type]!r}")
        cls.model_type = model_type
        _MODEL_REGISTRY[model_type] = cls
        return cls

    return _register


def list_models() -> list[str]:
    """The registered model type names, sorted."""
    return sorted(_MODEL_REGISTRY)


def model_class(model_type: str) -> type[CheckpointMixin]:
    """The class registered under ``model_type``; a clear error lists the known types."""
    try:
        return _MODEL_REGISTRY[model_type]
    except KeyError:
        raise UnknownModelTypeError(
            f"unknown model type {model_type!r}; known types: {', '.join(list_models()) or 'none'}"
        ) from None


def create_model(model_type: str, **kwargs: Any) -> CheckpointMixin:
    """A new, untrained model of ``model_type`` built from hyperparameters."""
    return model_class(model_type)(**kwargs)


def load_model(name_or_path: str | Path, revision: str | None = None, *, quantization: str | None = None,
               **kwargs: Any) -> CheckpointMixin:
    """Load any checkpoint by name, folder, ``s3://`` location or Hugging Face repo id.

    The folder's ``config.json`` names the model type, so the caller never needs to know it; it is read once
    and handed to the model class. ``quantization="int8"`` quantizes the linear layers where it pays (a text
    transformer's) for faster inference once the float weights are loaded (see ``CheckpointMixin.quantize``).
    """
    resolved = resolve_checkpoint(str(name_or_path), revision=revision)
    config, config_sha256 = read_config(resolved.folder)
    try:
        cls = model_class(config["model_type"])
    except UnknownModelTypeError as exc:
        raise UnknownModelTypeError(f"{resolved.folder / CONFIG_FILE}: {exc}") from None
    model = cls.from_resolved(resolved, config, config_sha256, **kwargs)
    if quantization is not None:
        model.quantize(quantization)
    return model

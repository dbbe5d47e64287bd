"""Model registry and factory, timm style: every model family registers under a type name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UnknownModelTypeError

if TYPE_CHECKING:
    from .checkpoint import CheckpointMixin

_MODEL_REGISTRY: dict[str, type[CheckpointMixin]] = {}

M = TypeVar("M", bound="type[CheckpointMixin]")


def register_model(model_type: str) -> Callable[[M], M]:
    """Class decorator: make ``model_type`` creatable and loadable through the factory."""

    def _register(cls: M) -> M:
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


def load_model(name_or_path: str, revision: str | None = None, **kwargs: Any) -> CheckpointMixin:
    """Load any checkpoint by name, folder, ``s3://`` location or Hugging Face repo id.

    The folder's ``config.json`` names the model type, so the caller never needs to know it.
    """
    from .checkpoint import CONFIG_FILE, read_config
    from .hub import resolve_checkpoint

    resolved = resolve_checkpoint(name_or_path, revision=revision)
    model_type = read_config(resolved.folder)["model_type"]
    try:
        cls = model_class(model_type)
    except UnknownModelTypeError as exc:
        raise UnknownModelTypeError(f"{resolved.folder / CONFIG_FILE}: {exc}") from None
    return cls.from_pretrained(resolved, **kwargs)

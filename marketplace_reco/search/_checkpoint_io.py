"""The one place where the search package uses the models' checkpoint format and hub.

A saved listing index is a checkpoint-style folder (``config.json``, ``model.safetensors``, ``README.md``) that
travels through the same hubs as the models (local folders, S3, the Hugging Face Hub). Everything the package
needs from ``marketplace_reco.models`` is imported here, so a move of those modules is a change of this file only.
"""

from pathlib import Path
from typing import Any

from ..models import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ResolvedCheckpoint,
    push_checkpoint,
    resolve_checkpoint,
)
from ..models import read_config as _read_config_and_sha256


def read_config(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's validated ``config.json``."""
    return _read_config_and_sha256(folder)[0]


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "ResolvedCheckpoint",
    "push_checkpoint",
    "read_config",
    "resolve_checkpoint",
]

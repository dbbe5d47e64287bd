"""The one place where the search package uses the models' checkpoint format and hub.

A saved listing index is a checkpoint-style folder (``config.json``, ``model.safetensors``, ``README.md``) that
travels through the same hubs as the models (local folders, S3, the Hugging Face Hub). Everything the package
needs from ``marketplace_reco.models`` is imported here, so a move of those modules is a change of this file only.
"""

from ..models.checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, read_config
from ..models.errors import CheckpointError
from ..models.hub import ResolvedCheckpoint, push_checkpoint, resolve_checkpoint

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

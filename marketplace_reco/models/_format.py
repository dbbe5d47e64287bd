"""The checkpoint format's constants and its config file: the leaf every other checkpoint module builds on.

A checkpoint is a folder: ``config.json`` (model type, format version, init arguments, metrics, data summary),
``model.safetensors`` (arrays only, each with its sha256, and the sha256 of ``config.json`` and of any extra
file the model saves, in the file's header) and a ``README.md`` model card. Files a training run leaves beside
them (plots, ``history.json``) are documentation; anything else is reported when the checkpoint loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

#: 2: the weights file's header records the sha256 of config.json (and of extra files such as a tokenizer's).
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
#: Keys ``config.json`` holds for the format itself rather than for a model's ``__init__`` arguments.
FORMAT_KEYS = ("model_type", "format_version", "metrics", "data_summary")
#: What a training run writes beside a checkpoint for people to read; never loaded.
DOCUMENTATION_SUFFIXES = (".png", ".svg", ".json", ".md", ".txt", ".csv")
#: Serialisation formats that execute code when loaded: never part of a checkpoint.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz")
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """A checkpoint's ``config.json``, validated (type present, format not newer than ours), and its bytes' sha256."""
    path = folder / CONFIG_FILE
    try:
        raw = path.read_bytes()
        config = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {folder} is not a checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}: no 'model_type' key")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this marketplace_reco understands "
            f"({FORMAT_VERSION}); upgrade the package"
        )
    return config, hashlib.sha256(raw).hexdigest()


def content_revision(folder: Path) -> str:
    """A short content hash of a checkpoint's weights and config: the revision of an unversioned folder."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            digest.update((folder / name).read_bytes())
        except OSError as exc:
            raise CheckpointError(f"{folder / name}: unreadable or missing ({exc.strerror})") from exc
    return digest.hexdigest()[:12]

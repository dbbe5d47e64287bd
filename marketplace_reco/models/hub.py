"""Where checkpoints live: a local folder, an S3 bucket or the Hugging Face Hub, behind one interface.

(First version: local names and folders. S3 and Hugging Face resolution, push and pull come next.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..settings import checkpoints_dir
from .checkpoint import CONFIG_FILE, content_revision
from .errors import CheckpointNotFoundError


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint made available as a local folder, with the name and revision it came from."""

    folder: Path
    name: str
    revision: str


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> ResolvedCheckpoint:
    """Turn a name (in the local checkpoints folder) or a folder path into a local checkpoint folder."""
    for candidate in (Path(name_or_path), checkpoints_dir() / name_or_path):
        if (candidate / CONFIG_FILE).is_file():
            return ResolvedCheckpoint(candidate, name_or_path, revision or content_revision(candidate))
    raise CheckpointNotFoundError(
        f"no checkpoint {name_or_path!r}: neither a folder with {CONFIG_FILE} nor a name under {checkpoints_dir()}"
    )

"""Arrays on disk for saved indexes: a safetensors file whose header holds each array's sha256, and the card.

The same scheme as the models' checkpoints: safetensors (never pickle) for the arrays, their checksums in the
file's metadata because the format itself does not catch changed bytes, and every key, dtype and shape checked
before anything is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .errors import IndexFileError

_CHECKSUMS_METADATA = "sha256"
CARD_TEMPLATE = Path(__file__).with_name("index_card.md")


def _sha256(array: np.ndarray) -> str:
    # Hash the buffer in place: a copy of a million vectors would double the memory of a save.
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to the safetensors file ``path`` with their sha256 in its header."""
    arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
    checksums = {key: _sha256(value) for key, value in arrays.items()}
    save_file(arrays, str(path), metadata={"format": "np", _CHECKSUMS_METADATA: json.dumps(checksums, sort_keys=True)})


def read_arrays(path: Path, expected: dict[str, tuple[np.dtype, tuple[int | None, ...]]]) -> dict[str, np.ndarray]:
    """Read the arrays of ``path``, which must be exactly the keys of ``expected`` with its dtypes and shapes
    (``None`` in a shape: any length) and match their checksums."""
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise IndexFileError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise IndexFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise IndexFileError(f"{path}: missing arrays {missing}, unexpected arrays {unexpected}")
    for key, (dtype, shape) in expected.items():
        array = arrays[key]
        fits = array.ndim == len(shape) and all(want is None or want == got for want, got in zip(shape, array.shape))
        if array.dtype != dtype or not fits:
            wanted = [("any" if length is None else length) for length in shape]
            raise IndexFileError(f"{path}: array {key!r} is {array.dtype} {list(array.shape)}, "
                                 f"the config expects {np.dtype(dtype)} {wanted}")
    try:
        checksums = json.loads(metadata[_CHECKSUMS_METADATA])
    except (KeyError, ValueError):
        raise IndexFileError(f"{path}: header has no valid {_CHECKSUMS_METADATA!r} entry (array checksums); "
                             "it was not written by marketplace_reco") from None
    for key, array in arrays.items():
        if checksums.get(key) != _sha256(array):
            raise IndexFileError(f"{path}: array {key!r} does not match its sha256; the file is corrupted")
    return arrays


def render_card(values: dict[str, Any]) -> str:
    """The README.md of a saved index, from ``index_card.md`` filled with ``values``."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["json"] = lambda value: json.dumps(value, sort_keys=True)
    try:
        template = CARD_TEMPLATE.read_text(encoding="utf-8")
    except OSError as exc:
        raise IndexFileError(f"{CARD_TEMPLATE}: index card template unreadable ({exc})") from exc
    return env.from_string(template).render(**values)

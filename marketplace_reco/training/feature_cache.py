"""Cache of per-item feature arrays, so a frozen network runs once per photo (or text) rather than once per epoch.

Entries are keyed by ``(fingerprint, item id)``. The fingerprint identifies whatever computed the arrays (for an
image model, ``ImageClassifier.trunk_fingerprint()``: backbone, frozen weights, preprocessing), so arrays of
another network or of changed weights are never handed out: a lookup under a new fingerprint simply misses.
An item may have several arrays (the frozen ResNet trunk hands two tensors to its trainable tail); all
items of one fingerprint have the same shapes.

Arrays are kept in memory up to ``memory_budget_bytes`` (all fingerprints together); beyond it they spill to
a private folder of memory-mapped files under ``settings.cache_dir()/features``, deleted when the cache is
closed. Float arrays are stored as float16 by default, halving memory: the relative rounding error is below
1e-3, far below what changes a classifier's decisions (the tests check the tolerance).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._progress import progress_bar
from ..settings import cache_dir

#: Default memory budget: 2 GiB holds the ResNet-50 trunk outputs of ~8,000 photos at 224 px in float16.
DEFAULT_MEMORY_BUDGET = 2 * 2**30


def state_fingerprint(description: Any, state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a JSON-serialisable ``description`` and the tensors of ``state``: a cache fingerprint."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCacheError(Exception):
    """Arrays that do not fit the cache (shape, count, overflow) or a lookup of items never stored."""


class _SpillFile:
    """A growing file of fixed-shape rows, written by appending and read through a memory map."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.row_shape = row_shape
        self.dtype = dtype
        self.rows = 0
        self._map: np.memmap | None = None
        path.touch()

    def append(self, rows: np.ndarray) -> int:
        """Write ``rows`` at the end; returns the index of the first one."""
        start = self.rows
        with self.path.open("ab") as handle:
            handle.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)
        self._map = None
        return start

    def read(self, indices: np.ndarray) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.rows, *self.row_shape))
        return np.asarray(self._map[indices])


@dataclass
class _Group:
    """The entries of one fingerprint: shapes fixed by the first ``put``."""

    row_shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    memory: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    spill: list[_SpillFile] = field(default_factory=list)

    @property
    def row_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in zip(self.row_shapes, self.dtypes))


class FeatureCache:
    """Feature arrays keyed by (fingerprint, item id): in memory up to a budget, then on disk.

    ``put(fingerprint, ids, arrays)`` takes one batch array per output (first axis: the items), ``get``
    returns them stacked the same way, ``fill`` computes only the missing items, batch by batch, with a
    progress bar. Use as a context manager, or call ``close()``, to delete the spill files early.
    """

    def __init__(self, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, spill_dir: Path | None = None,
                 float_dtype: str = "float16") -> None:
        if memory_budget_bytes < 0:
            raise FeatureCacheError(f"memory_budget_bytes must be >= 0, not {memory_budget_bytes}")
        self.memory_budget_bytes = memory_budget_bytes
        self.float_dtype = np.dtype(float_dtype)
        if self.float_dtype.kind != "f":
            raise FeatureCacheError(f"float_dtype must be a float type, not {float_dtype!r}")
        self._spill_parent = Path(spill_dir) if spill_dir is not None else cache_dir() / "features"
        self._spill_dir: Path | None = None
        self._groups: dict[str, _Group] = {}
        self.nbytes_in_memory = 0
        self._finalizer: weakref.finalize | None = None

    # ---- queries -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(group.memory) + len(group.disk) for group in self._groups.values())

    @property
    def nbytes_on_disk(self) -> int:
        return sum(spill.rows * int(np.prod(spill.row_shape)) * spill.dtype.itemsize
                   for group in self._groups.values() for spill in group.spill)

    def missing(self, fingerprint: str, ids: Sequence[str]) -> list[str]:
        """The ids (in order, without duplicates) that have no entry under ``fingerprint``."""
        group = self._groups.get(fingerprint)
        if group is None:
            return list(dict.fromkeys(ids))
        return [i for i in dict.fromkeys(ids) if i not in group.memory and i not in group.disk]

    def get(self, fingerprint: str, ids: Sequence[str]) -> list[np.ndarray]:
        """One stacked array per output, rows in the order of ``ids`` (stored dtype, e.g. float16)."""
        absent = self.missing(fingerprint, ids)
        if absent:
            raise FeatureCacheError(
                f"feature cache has no entry for {len(absent)} id(s) under fingerprint {fingerprint!r}, "
                f"e.g. {absent[:3]}; fill() them first"
            )
        group = self._groups[fingerprint]
        outputs = [np.empty((len(ids), *shape), dtype=dtype) for shape, dtype in zip(group.row_shapes, group.dtypes)]
        on_disk = [(row, group.disk[i]) for row, i in enumerate(ids) if i in group.disk]
        for row, item in enumerate(ids):
            arrays = group.memory.get(item)
            if arrays is not None:
                for output, array in zip(outputs, arrays):
                    output[row] = array
        if on_disk:
            rows, positions = (np.asarray(column) for column in zip(*on_disk))
            order = np.argsort(positions)  # sequential reads from the memory map
            for output, spill in zip(outputs, group.spill):
                output[rows[order]] = spill.read(positions[order])
        return outputs

    # ---- updates -------------------------------------------------------------------------------------
    def put(self, fingerprint: str, ids: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Store one batch: ``arrays[k][j]`` is output ``k`` of item ``ids[j]``. Existing entries are replaced."""
        arrays = [self._storage_array(np.asarray(a), fingerprint) for a in arrays]
        if len(set(ids)) != len(ids):
            raise FeatureCacheError(f"put: duplicate ids in one batch of {len(ids)}")
        if any(len(a) != len(ids) for a in arrays):
            raise FeatureCacheError(f"put: {len(ids)} ids but arrays with {[len(a) for a in arrays]} rows")
        group = self._group(fingerprint, arrays)
        for item in ids:
            self._discard(group, item)
        in_memory = 0
        while in_memory < len(ids) and self.nbytes_in_memory + group.row_bytes <= self.memory_budget_bytes:
            group.memory[ids[in_memory]] = tuple(a[in_memory].copy() for a in arrays)
            self.nbytes_in_memory += group.row_bytes
            in_memory += 1
        if in_memory < len(ids):
            if not group.spill:
                folder = self._ensure_spill_dir()
                group.spill = [_SpillFile(folder / f"{fingerprint}.{k}.bin", shape, dtype)
                               for k, (shape, dtype) in enumerate(zip(group.row_shapes, group.dtypes))]
            starts = {spill.append(a[in_memory:]) for spill, a in zip(group.spill, arrays)}
            (start,) = starts  # every output file has the same number of rows
            for offset, item in enumerate(ids[in_memory:]):
                group.disk[item] = start + offset

    def fill(self, fingerprint: str, ids: Sequence[str], compute: Callable[[list[str]], Sequence[np.ndarray]],
             *, batch_size: int = 64, desc: str = "cache features") -> None:
        """Compute and store the entries of ``ids`` that are missing, ``batch_size`` ids per ``compute`` call."""
        todo = self.missing(fingerprint, ids)
        with progress_bar(total=len(todo), desc=desc, unit="item", disable=not todo) as progress:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                self.put(fingerprint, batch, compute(batch))
                progress.update(len(batch))

    def close(self) -> None:
        """Drop every entry and delete the spill files."""
        self._groups.clear()
        self.nbytes_in_memory = 0
        if self._finalizer is not None:
            self._finalizer()
        self._spill_dir = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers -------------------------------------------------------------------------------------
    def _storage_array(self, array: np.ndarray, fingerprint: str) -> np.ndarray:
        if array.dtype.kind != "f" or array.dtype == self.float_dtype:
            return array
        with np.errstate(over="ignore"):  # reported below, with the fingerprint
            stored = array.astype(self.float_dtype)
        if not np.isfinite(stored).all() and np.isfinite(array).all():
            raise FeatureCacheError(
                f"features of {fingerprint!r} overflow {self.float_dtype} (largest magnitude "
                f"{float(np.abs(array).max()):.3g}); use FeatureCache(float_dtype='float32')"
            )
        return stored

    def _group(self, fingerprint: str, arrays: Sequence[np.ndarray]) -> _Group:
        shapes = tuple(tuple(a.shape[1:]) for a in arrays)
        dtypes = tuple(a.dtype for a in arrays)
        group = self._groups.get(fingerprint)
        if group is None:
            group = self._groups[fingerprint] = _Group(shapes, dtypes)
        elif (group.row_shapes, group.dtypes) != (shapes, dtypes):
            raise FeatureCacheError(
                f"put: fingerprint {fingerprint!r} holds arrays of shapes {group.row_shapes} ({group.dtypes}), "
                f"got {shapes} ({dtypes})"
            )
        return group

    def _discard(self, group: _Group, item: str) -> None:
        if group.memory.pop(item, None) is not None:
            self.nbytes_in_memory -= group.row_bytes
        group.disk.pop(item, None)  # its rows stay in the file, unreferenced

    def _ensure_spill_dir(self) -> Path:
        if self._spill_dir is None:
            self._spill_parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="spill-", dir=self._spill_parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        return self._spill_dir


@contextmanager
def cache_or_new(cache: FeatureCache | None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Iterator[FeatureCache]:
    """``cache`` itself (its owner closes it), or a new cache closed on leaving the block."""
    if cache is not None:
        yield cache
        return
    with FeatureCache(memory_budget_bytes=memory_budget_bytes) as new:
        yield new

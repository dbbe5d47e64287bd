"""FeatureCache: memory with spill to disk, fingerprint keys, float16 storage; equal to an uncached forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from marketplace_reco.models.image_classifier import ImageClassifier
from marketplace_reco.training.feature_cache import FeatureCache, FeatureCacheError
from marketplace_reco.training.image_classifier import trunk_fingerprint


def _arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 4, 3, 3)).astype(np.float32), rng.normal(size=(n, 7)).astype(np.float32)]


def test_put_get_keeps_order_and_float16_precision(tmp_path: Path) -> None:
    arrays = _arrays(6)
    ids = [f"img{i}" for i in range(6)]
    with FeatureCache(spill_dir=tmp_path) as cache:
        cache.put("fp", ids, arrays)
        got = cache.get("fp", ["img4", "img0", "img4"])
        assert [g.dtype for g in got] == [np.float16, np.float16]
        for stored, original in zip(got, arrays):
            np.testing.assert_allclose(stored.astype(np.float32), original[[4, 0, 4]], rtol=1e-3, atol=1e-3)
        assert len(cache) == 6
        assert cache.nbytes_in_memory == 6 * (4 * 3 * 3 + 7) * 2


def test_fingerprint_is_part_of_the_key(tmp_path: Path) -> None:
    with FeatureCache(spill_dir=tmp_path) as cache:
        cache.put("weights-a", ["x", "y"], _arrays(2))
        assert cache.missing("weights-a", ["x", "y", "z"]) == ["z"]
        assert cache.missing("weights-b", ["x", "y"]) == ["x", "y"]
        with pytest.raises(FeatureCacheError, match="no entry for 2 id"):
            cache.get("weights-b", ["x", "y"])


def test_spills_to_disk_beyond_the_memory_budget_and_cleans_up(tmp_path: Path) -> None:
    arrays = _arrays(10)
    ids = [f"img{i}" for i in range(10)]
    row_bytes = (4 * 3 * 3 + 7) * 2
    cache = FeatureCache(memory_budget_bytes=3 * row_bytes, spill_dir=tmp_path)
    cache.put("fp", ids[:5], [a[:5] for a in arrays])
    cache.put("fp", ids[5:], [a[5:] for a in arrays])
    assert cache.nbytes_in_memory == 3 * row_bytes
    assert cache.nbytes_on_disk == 7 * row_bytes
    spill_files = list(tmp_path.rglob("*.bin"))
    assert len(spill_files) == 2
    order = [9, 0, 5, 2, 7]
    for stored, original in zip(cache.get("fp", [ids[i] for i in order]), arrays):
        np.testing.assert_allclose(stored.astype(np.float32), original[order], rtol=1e-3, atol=1e-3)
    cache.close()
    assert not any(path.exists() for path in spill_files)


def test_fill_computes_only_missing_items(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def compute(ids: list[str]) -> list[np.ndarray]:
        calls.append(ids)
        return [np.array([[float(i[1:])] for i in ids], dtype=np.float32)]

    with FeatureCache(spill_dir=tmp_path) as cache:
        cache.fill("fp", ["i1", "i2"], compute, batch_size=8)
        cache.fill("fp", ["i1", "i2", "i3", "i4", "i5"], compute, batch_size=2)
        assert calls == [["i1", "i2"], ["i3", "i4"], ["i5"]]
        assert cache.get("fp", ["i5", "i1"])[0].ravel().tolist() == [5.0, 1.0]


def test_bad_puts_are_refused(tmp_path: Path) -> None:
    with FeatureCache(spill_dir=tmp_path) as cache:
        with pytest.raises(FeatureCacheError, match="overflow float16"):
            cache.put("fp", ["a"], [np.array([[1e6]], dtype=np.float32)])
        cache.put("fp", ["a"], [np.zeros((1, 3), dtype=np.float32)])
        with pytest.raises(FeatureCacheError, match="holds arrays of shapes"):
            cache.put("fp", ["b"], [np.zeros((1, 4), dtype=np.float32)])
        with pytest.raises(FeatureCacheError, match="duplicate ids"):
            cache.put("fp", ["c", "c"], [np.zeros((2, 3), dtype=np.float32)])


@pytest.mark.parametrize("memory_budget", [1 << 30, 0], ids=["in-memory", "on-disk"])
def test_cached_trunk_outputs_give_the_uncached_features(tmp_path: Path, memory_budget: int) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(["a", "b", "c"], backbone="test_resnet", preprocessing={"image_size": 64}).eval()
    x = torch.randn(5, 3, 64, 64)
    ids = [f"photo{i}" for i in range(5)]

    def compute(batch: list[str]) -> list[np.ndarray]:
        rows = [ids.index(i) for i in batch]
        return [t.numpy() for t in model.frozen_trunk(x[rows])]

    with FeatureCache(memory_budget_bytes=memory_budget, spill_dir=tmp_path) as cache, torch.no_grad():
        fingerprint = trunk_fingerprint(model)
        cache.fill(fingerprint, ids, compute, batch_size=2)
        cached = [torch.from_numpy(a).float() for a in cache.get(fingerprint, ids)]
        from_cache = model.features_from_trunk(*cached)
        uncached = model.features(x)
    assert len(cached) == 2  # the last block's main path and its shortcut
    torch.testing.assert_close(from_cache, uncached, rtol=1e-2, atol=1e-2)
    assert from_cache.abs().max() > 0.1  # not trivially equal because everything is zero


def test_trunk_fingerprint_follows_frozen_weights_only() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(["a", "b"], backbone="test_resnet", preprocessing={"image_size": 32})
    before = trunk_fingerprint(model)
    with torch.no_grad():
        model.head[1].weight.add_(1.0)
        model.backbone.get_parameter(model.trainable_module_names[-1] + ".weight").add_(1.0)
    assert trunk_fingerprint(model) == before
    with torch.no_grad():
        model.backbone.conv1[0].weight.add_(1.0)
    assert trunk_fingerprint(model) != before

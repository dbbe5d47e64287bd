"""Splits by product: no product (hence no photo) crosses splits, stratified, deterministic, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from marketplace_reco.data.errors import DataConfigError, DataError
from marketplace_reco.data.splits import split_by_product


def _labels(counts: dict[str, int]) -> pd.Series:
    """Labels indexed by product id, ``counts[label]`` products per label."""
    rows = [(f"{label[:3]}-{i:04d}", label) for label, n in counts.items() for i in range(n)]
    return pd.Series([label for _, label in rows], index=[pid for pid, _ in rows], name="label")


LABELS = _labels({"Appliances": 50, "Home & Garden": 97, "Other Goods": 13, "Tiny": 3, "Pair": 2})


def test_every_product_in_exactly_one_split() -> None:
    splits = split_by_product(LABELS, (0.8, 0.1, 0.1), seed=0)
    assigned = [pid for ids in splits.values() for pid in ids]
    assert sorted(assigned) == sorted(LABELS.index)
    assert len(set(assigned)) == len(assigned)


def test_no_photo_of_a_product_crosses_splits(sample_marketplace) -> None:
    parts = sample_marketplace.split((0.6, 0.2, 0.2), seed=3)
    owner: dict[str, str] = {}
    for name, part in parts.items():
        for image_id, product_id in part.images_frame()[["image_id", "product_id"]].itertuples(index=False):
            assert owner.setdefault(image_id, name) == name, f"photo {image_id} of {product_id} in two splits"
    all_images = set(sample_marketplace.images_frame()["image_id"])
    assert set(owner) == all_images
    # Splits keep the full class list, so class indices mean the same in each part.
    assert all(part.classes == sample_marketplace.classes for part in parts.values())


def test_stratified_proportions_per_class() -> None:
    splits = split_by_product(LABELS, (0.8, 0.1, 0.1), seed=1)
    for label, n in LABELS.value_counts().items():
        per_split = {name: int((LABELS.loc[ids] == label).sum()) for name, ids in splits.items()}
        assert sum(per_split.values()) == n
        if n >= 3:  # enough products: every split has the class
            assert min(per_split.values()) >= 1, (label, per_split)
        if n >= 10:  # below that, the one-per-split minimum outweighs the fractions
            for name, fraction in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
                assert abs(per_split[name] - n * fraction) <= 1, (label, per_split)
    # Two products cannot fill three splits: both stay in training rather than leaving it empty.
    assert (LABELS.loc[splits["train"]] == "Pair").sum() == 2


def test_deterministic_and_independent_of_row_order() -> None:
    first = split_by_product(LABELS, seed=7)
    shuffled = LABELS.sample(frac=1.0, random_state=123)
    assert split_by_product(shuffled, seed=7) == first
    assert split_by_product(LABELS, seed=8) != first


def test_adding_a_class_does_not_reshuffle_the_others() -> None:
    before = split_by_product(LABELS, seed=0)
    after = split_by_product(pd.concat([LABELS, _labels({"New class": 20})]), seed=0)
    for name in before:
        assert [pid for pid in after[name] if not pid.startswith("New")] == before[name]


def test_zero_fraction_split_is_empty() -> None:
    splits = split_by_product(LABELS, (0.9, 0.1, 0.0), seed=0)
    assert splits["test"] == []
    assert len(splits["train"]) + len(splits["val"]) == len(LABELS)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.1), "three numbers"),
        ((0.8, 0.3, 0.1), "sum to 1"),
        ((0.0, 0.5, 0.5), "train > 0"),
        ((1.1, -0.1, 0.0), "non-negative"),
        ((0.8, float("nan"), 0.2), "non-negative"),
    ],
)
def test_bad_fractions_are_a_clear_error(fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(DataConfigError, match=message):
        split_by_product(LABELS, fractions)


def test_duplicate_ids_and_missing_labels_are_errors() -> None:
    with pytest.raises(DataError, match="duplicate product ids.*'App-0000'"):
        split_by_product(pd.concat([LABELS, LABELS.iloc[:1]]))
    with pytest.raises(DataError, match="have no label"):
        split_by_product(pd.concat([LABELS, pd.Series([None], index=["x-1"])]))

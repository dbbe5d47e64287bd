"""Held-out figures shared by every training run and benchmark: the numbers that go into config.json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


def expected_calibration_error(y_true: Sequence[int], proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """How far the top-class confidence is from the accuracy, on average (Guo et al., 2017).

    Predictions are put in ``bins`` equal-width bins of their top-class probability (``(0, 1/bins]``, ...,
    ``((bins-1)/bins, 1]``); the error is the bins' |accuracy - mean confidence|, weighted by their share of
    the predictions. 0 is perfectly calibrated.
    """
    proba = np.asarray(proba)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for index in np.unique(which):
        members = which == index
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def evaluate(y_true: Sequence[int], proba: np.ndarray, classes: Sequence[str], split: str = "test") -> dict[str, Any]:
    """Accuracy, macro-F1, expected calibration error (``ece``), per-class precision/recall/F1 and the confusion
    matrix of ``proba``'s argmax."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(proba).argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "split": split,
        "n_samples": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "ece": expected_calibration_error(y_true, proba),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def same_listing_ranks(vectors: np.ndarray, owners: Sequence[Any], queries: Sequence[int] | None = None,
                       k: int = 10) -> np.ndarray:
    """For each query photo, the rank (1 .. ``k``) of the first photo of its own listing among its ``k`` nearest other
    photos by cosine similarity among ``vectors`` [n, d], 0 where none is. ``owners[i]`` is photo i's listing;
    ``queries`` are row indices (default: every photo of a listing with two or more)."""
    _, codes, counts = np.unique(np.asarray(owners), return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[codes] >= 2) if queries is None else np.asarray(queries, dtype=np.int64)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    ranks = np.zeros(len(rows), dtype=np.int64)
    for start in range(0, len(rows), 1024):  # 1,024 query rows of similarities at a time bound the memory
        chunk = rows[start:start + 1024]
        similarity = unit[chunk] @ unit.T
        similarity[np.arange(len(chunk)), chunk] = -np.inf
        hits = codes[np.argsort(-similarity, axis=1)[:, :k]] == codes[chunk][:, None]
        ranks[start:start + len(chunk)] = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
    return ranks


def same_listing_recall(vectors: np.ndarray, owners: Sequence[Any], k: int = 10) -> float:
    """Share of photos (of listings with two or more) whose ``k`` nearest other photos by cosine similarity among
    ``vectors`` [n, d] include one of their own listing's (``owners[i]``: photo i's listing)."""
    ranks = same_listing_ranks(vectors, owners, k=k)
    return float(np.mean(ranks > 0)) if len(ranks) else float("nan")

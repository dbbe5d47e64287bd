"""Pictures of a training run for people, as PNGs: the confusion matrix, the training curves, word vectors in 2-D."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # training runs headless
import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from ..models.word2vec import Word2VecEmbedding


def plot_confusion_matrix(metrics: dict[str, Any], classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts, written as a PNG."""
    counts = np.asarray(metrics["confusion_matrix"])
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(history: Sequence[dict[str, float]], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch (one dict per epoch, keys such as train_loss, val_loss, val_accuracy).

    Rows with a ``member`` key (an ensemble's members, trained one after the other) get a line per member.
    """
    by_member: dict[int, list[dict[str, float]]] = {}
    for row in history:
        by_member.setdefault(int(row.get("member", 0)), []).append(row)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, suffix in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for key in sorted({k for row in history for k in row if k.endswith(suffix)}):
            for member, rows in sorted(by_member.items()):
                label = f"{key} (member {member})" if member else key
                ax.plot([row["epoch"] for row in rows], [row.get(key, np.nan) for row in rows], marker="o",
                        markersize=3, label=label)
    loss_ax.set_title("loss")
    acc_ax.set_title("accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_embedding_2d(
    embedding: Word2VecEmbedding,
    path: Path,
    *,
    n_words: int = 200,
    method: Literal["tsne", "pca"] = "tsne",
    seed: int = 0,
) -> Path:
    """Scatter the ``n_words`` most frequent tokens in 2-D (t-SNE or PCA), labelled, as a PNG."""
    # Index order is frequency order, after <pad> and <unk>.
    words = embedding.vocabulary[2: 2 + n_words]
    vectors = embedding.vectors[2: 2 + len(words)]
    if len(words) < 3:
        raise ValueError(f"plot_embedding_2d: the vocabulary has only {len(words)} tokens, at least 3 are needed")
    if method == "tsne":
        reducer: Any = TSNE(n_components=2, perplexity=min(30.0, len(words) - 1.0), init="pca", random_state=seed,
                            metric="cosine")
    else:
        reducer = PCA(n_components=2, random_state=seed)
    points = reducer.fit_transform(vectors)
    fig, ax = plt.subplots(figsize=(14, 14))
    ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.5)
    for word, (x, y) in zip(words, points, strict=True):
        ax.annotate(word, (x, y), fontsize=7, alpha=0.8)
    ax.set_title(f"word2vec: {len(words)} most frequent tokens ({method.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

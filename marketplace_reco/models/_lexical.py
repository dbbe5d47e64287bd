"""A linear model over hashed word 1-2-gram TF-IDF, added to a text model's logits (wide and deep).

A fine-tuned transformer reads meaning; a linear model over word n-grams reads exact words (brands, model numbers,
"ps4", "pram") that a few thousand training texts teach it directly. Their errors differ, so their sum is better
than either (measured in ``reports/bench_text_transformer_lexical.md``). The n-grams are hashed (scikit-learn's
``HashingVectorizer``: MurmurHash3, stable across versions), so the checkpoint holds no vocabulary, only arrays:
the inverse document frequencies, the weights and the biases; the tokenisation (``TextPreprocessor``) is in the
owning model's ``config.json``. It is fitted after the encoder (``training.text_transformer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..data.text import TextPreprocessor, clean_listing_text


class LexicalHead(nn.Module):
    """``scores(texts) -> [n, n_classes]``: weights . l2-normalised (1 + log tf) x idf of hashed word 1-2-grams."""

    def __init__(self, n_classes: int, n_features: int, preprocessing: dict[str, Any]) -> None:
        super().__init__()
        self.n_features = n_features
        self.preprocessor = TextPreprocessor.from_config(preprocessing)
        self.register_buffer("idf", torch.ones(n_features))
        # [n_features, n_classes]: a text's few n-grams pick rows, so scoring reads no more than them.
        self.register_buffer("weight", torch.zeros(n_features, n_classes))
        self.register_buffer("bias", torch.zeros(n_classes))

    def _tokens(self, text: str) -> list[str]:
        return self.preprocessor.tokenize(clean_listing_text(text, None))

    def counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        """[n, n_features] word 1-2-gram counts of raw texts, hashed."""
        from sklearn.feature_extraction.text import HashingVectorizer

        hashing = HashingVectorizer(n_features=self.n_features, tokenizer=self._tokens, lowercase=False,
                                    token_pattern=None, ngram_range=(1, 2), alternate_sign=False, norm=None,
                                    dtype=np.float32)
        return hashing.transform(list(texts))

    def features(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """[n, n_features] l2-normalised sublinear TF-IDF rows of ``counts`` (the fitted ``idf``, 0 for n-grams no
        training text has; ``counts`` is overwritten); a text without a known n-gram is a zero row."""
        from sklearn.preprocessing import normalize

        counts.data = (1.0 + np.log(counts.data)) * _array(self.idf)[counts.indices]
        return normalize(counts, copy=False)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """[n, n_classes] float32 linear scores of raw texts."""
        return np.asarray(self.features(self.counts(texts)) @ _array(self.weight) + _array(self.bias),
                          dtype=np.float32)


def _array(buffer: torch.Tensor) -> np.ndarray:
    # A CPU float32 buffer as numpy without a copy (the weights are tens of megabytes).
    return buffer.detach().cpu().numpy()

"""Skip-gram word2vec vectors as a checkpoint, and the token encoding shared with the text CNN.

Only the vectors are kept (``model.safetensors``, one row per vocabulary entry); the vocabulary, in
index order, and the text preprocessing travel in ``config.json``. The gensim model object is never
saved, so no pickle is ever loaded. Index 0 is ``<pad>`` and 1 is ``<unk>`` (both zero vectors), the
remaining entries are the training tokens from most to least frequent, so the vocabulary indexes an
``nn.Embedding`` directly.

The vectors are trained by ``training.word2vec`` (gensim, negative sampling). Given the training texts'
classes, word2vec also reads each text's class as a pseudo-word placed every
``label_interval`` tokens (and at both ends), so skip-gram moves the vectors of words seen in one class's
listings towards each other: the embedding becomes class-aware. Why: a few thousand short listings teach
plain word2vec topical similarity only loosely, and a CNN over frozen vectors then trails one that
fine-tunes them; with the class pseudo-words the frozen-embedding CNN gains 1.6 points of held-out accuracy
on the real listings (0.811 to 0.827 over the same five splits, ``scripts/bench_text.py``). The pseudo-words
are dropped from the vocabulary, so the checkpoint holds word vectors only, and only training-split classes
are ever read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.text import TextPreprocessor, clean_listing_text
from ._checkpoint import CheckpointMixin
from ._registry import register_model
from .errors import CheckpointError

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_INDEX, UNK_INDEX = 0, 1


@dataclass(frozen=True)
class EncodedTexts:
    """Token indices of a batch of texts."""

    #: [n, max_length] int64; tokens first, then ``PAD_INDEX``; out-of-vocabulary tokens are ``UNK_INDEX``.
    #: A text without any token is a single ``UNK_INDEX``, so every row still gets a prediction.
    ids: np.ndarray
    #: [n] how many of each text's tokens (before truncation) are in the vocabulary; 0 means "no known word".
    known: np.ndarray


class TokenEncoder:
    """Raw text -> token indices over a vocabulary whose entries 0 and 1 are ``<pad>`` and ``<unk>``.

    Raw text goes through ``clean_listing_text`` first (it is idempotent on already clean text), so a
    model fed the exported listing text, the cleaned training text or a user's string tokenises alike.
    """

    def __init__(self, vocabulary: Sequence[str], preprocessing: dict[str, Any]) -> None:
        if list(vocabulary[:2]) != [PAD_TOKEN, UNK_TOKEN]:
            raise CheckpointError(
                f"vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}; it starts with {list(vocabulary[:2])!r}"
            )
        self.index = {token: i for i, token in enumerate(vocabulary)}
        if len(self.index) != len(vocabulary):
            raise CheckpointError(f"vocabulary has {len(vocabulary) - len(self.index)} duplicated token(s)")
        self.preprocessor = TextPreprocessor.from_config(preprocessing)

    def tokenize(self, text: str) -> list[str]:
        """Tokens of one raw or clean text."""
        return self.preprocessor.tokenize(clean_listing_text(text, None))

    def encode(self, texts: Sequence[str], max_length: int) -> EncodedTexts:
        """Indices of ``texts``, each truncated to ``max_length`` tokens and padded to ``max_length``."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of texts, not a single string")
        ids = np.full((len(texts), max_length), PAD_INDEX, dtype=np.int64)
        known = np.zeros(len(texts), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {row} is {type(text).__name__}, expected str")
            indices = [self.index.get(token, UNK_INDEX) for token in self.tokenize(text)]
            known[row] = sum(index != UNK_INDEX for index in indices)
            indices = indices[:max_length] or [UNK_INDEX]
            ids[row, : len(indices)] = indices
        return EncodedTexts(ids=ids, known=known)


@register_model("word2vec")
class Word2VecEmbedding(CheckpointMixin):
    """Word vectors from gensim's skip-gram word2vec with negative sampling (trained by ``training.word2vec``).

    ``vocabulary`` (index order) and ``preprocessing`` (``TextPreprocessor.to_config()``) define the lookup;
    ``window``, ``negative``, ``min_count``, ``epochs``, ``label_interval`` (0: plain word2vec, no class
    pseudo-words) and ``seed`` record how the vectors were trained.
    """

    input_kind = ""
    description = (
        "Skip-gram word2vec word vectors (gensim, negative sampling) trained on the cleaned name and "
        "description of the training listings, each listing's class read as a pseudo-word every label_interval "
        "tokens (0: none) so that words of one class get similar vectors; index 0 is <pad>, 1 is <unk>, then "
        "tokens by frequency."
    )

    def __init__(
        self,
        vocabulary: list[str],
        preprocessing: dict[str, Any],
        dim: int = 128,
        window: int = 5,
        negative: int = 10,
        min_count: int = 2,
        epochs: int = 20,
        label_interval: int = 0,
        seed: int = 0,
    ) -> None:
        self.vocabulary = list(vocabulary)
        self.preprocessing = preprocessing
        self.dim = dim
        self.encoder = TokenEncoder(self.vocabulary, preprocessing)
        self.vectors = np.zeros((len(self.vocabulary), dim), dtype=np.float32)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"vectors": self.vectors}

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.vectors = np.asarray(arrays["vectors"], dtype=np.float32)

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """[n, max_length] token indices of raw texts (see ``EncodedTexts.ids``)."""
        return self.encoder.encode(texts, max_length).ids

    def _token_index(self, word: str) -> int:
        """The index of a vocabulary token, or of the single token ``word`` preprocesses to ("Sofas" -> "sofa")."""
        if word in self.encoder.index and word not in (PAD_TOKEN, UNK_TOKEN):
            return self.encoder.index[word]
        tokens = self.encoder.tokenize(word)
        if len(tokens) == 1 and tokens[0] in self.encoder.index:
            return self.encoder.index[tokens[0]]
        raise KeyError(f"{word!r} is not in the word2vec vocabulary ({len(self.vocabulary) - 2:,} tokens; "
                       f"it preprocesses to {tokens!r})")

    def nearest(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` tokens closest to ``word`` by cosine similarity, most similar first."""
        norms = np.linalg.norm(self.vectors, axis=1)
        query = self._token_index(word)
        similarity = self.vectors @ self.vectors[query] / np.maximum(norms * norms[query], 1e-12)
        similarity[[PAD_INDEX, UNK_INDEX, query]] = -np.inf
        best = np.argsort(-similarity)[:k]
        return [(self.vocabulary[i], float(similarity[i])) for i in best if np.isfinite(similarity[i])]

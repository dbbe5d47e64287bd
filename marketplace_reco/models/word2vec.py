"""Skip-gram word2vec vectors (gensim, negative sampling) as a checkpoint; the token encoding shared with the CNN.

Only the vectors are kept (``model.safetensors``, one row per vocabulary entry); the vocabulary, in
index order, and the text preprocessing travel in ``config.json``. The gensim model object is never
saved, so no pickle is ever loaded. Index 0 is ``<pad>`` and 1 is ``<unk>`` (both zero vectors), the
remaining entries are the training tokens from most to least frequent, so the vocabulary indexes an
``nn.Embedding`` directly.

Given the training texts' classes, word2vec also reads each text's class as a pseudo-word placed every
``label_interval`` tokens (and at both ends), so skip-gram moves the vectors of words seen in one class's
listings towards each other: the embedding becomes class-aware. Why: a few thousand short listings teach
plain word2vec topical similarity only loosely, and a CNN over frozen vectors then trails one that
fine-tunes them; with the class pseudo-words the frozen-embedding CNN gains 1.6 points of held-out accuracy
on the real listings (0.811 to 0.827 over the same five splits, ``scripts/bench_text.py``). The pseudo-words
are dropped from the vocabulary, so the checkpoint holds word vectors only, and only training-split classes
are ever read.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..data.text import TextPreprocessor, clean_listing_text
from .checkpoint import CheckpointMixin
from .errors import CheckpointError
from .registry import register_model

if TYPE_CHECKING:
    from ..data.dataset import Marketplace

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


def training_fingerprint(product_ids: Iterable[Any]) -> str:
    """A hash of the set of products a model was trained on, to check later that two models share a split."""
    joined = "\n".join(sorted(str(product_id) for product_id in product_ids))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def _stable_hash(text: str) -> int:
    """gensim seeds each word's initial vector with this; the built-in ``hash`` changes with every process."""
    return zlib.crc32(text.encode("utf-8"))


@register_model("word2vec")
class Word2VecEmbedding(CheckpointMixin):
    """Word vectors from gensim's skip-gram word2vec with negative sampling (build with ``train_word2vec``).

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


class _EpochProgress:
    """gensim callback that advances a tqdm bar once per word2vec epoch."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=epochs, desc="word2vec epochs", disable=not enabled)

    def on_epoch_begin(self, model: Any) -> None:
        pass

    def on_epoch_end(self, model: Any) -> None:
        self.bar.update(1)

    def on_train_begin(self, model: Any) -> None:
        pass

    def on_train_end(self, model: Any) -> None:
        self.bar.close()


def _with_label_tokens(tokens: list[str], label: Any, interval: int) -> list[str]:
    """``tokens`` with ``label``'s pseudo-word first, after every ``interval`` tokens and last.

    The pseudo-word contains "<" and a space, which no token has, so it never collides with a word.
    """
    label_token = f"<label {label}>"
    sentence = [label_token]
    for start in range(0, len(tokens), interval):
        sentence += [*tokens[start: start + interval], label_token]
    return sentence


def train_word2vec(
    texts: Sequence[str],
    preprocessor: TextPreprocessor | None = None,
    *,
    labels: Sequence[Any] | None = None,
    label_interval: int = 3,
    dim: int = 128,
    window: int = 5,
    negative: int = 10,
    min_count: int = 2,
    epochs: int = 20,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> Word2VecEmbedding:
    """Train skip-gram word2vec (``sg=1``, negative sampling, no hierarchical softmax) on ``texts``.

    Pass only training-split texts: the embedding must not have seen validation or test listings.
    ``labels`` (one class per text, training split only) adds each text's class as a pseudo-word every
    ``label_interval`` tokens (see the module docstring); without ``labels``, or with ``label_interval`` 0, this
    is plain word2vec. ``preprocessor`` (default: ``TextPreprocessor()``) is stored in the checkpoint so the
    vocabulary is looked up exactly as it was built. With ``workers > 1`` gensim's threads make runs not
    bit-identical.
    """
    from gensim.models import Word2Vec

    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"train_word2vec: {len(labels)} labels for {len(texts)} texts")
    if label_interval < 0:
        raise ValueError(f"train_word2vec: label_interval must be 0 (off) or positive, not {label_interval}")
    label_interval = label_interval if labels is not None else 0
    preprocessor = preprocessor or TextPreprocessor()
    preprocessing = preprocessor.to_config()
    encoder = TokenEncoder([PAD_TOKEN, UNK_TOKEN], preprocessing)
    tokenized = [encoder.tokenize(text) for text in texts]
    token_count = sum(map(len, tokenized))
    if label_interval:
        tokenized = [_with_label_tokens(tokens, label, label_interval) if tokens else []
                     for tokens, label in zip(tokenized, labels, strict=True)]  # type: ignore[arg-type]
    sentences = [tokens for tokens in tokenized if tokens]
    if not sentences:
        raise ValueError(f"train_word2vec: none of the {len(texts)} texts has a token after preprocessing")
    model = Word2Vec(vector_size=dim, window=window, negative=negative, min_count=min_count, epochs=epochs,
                     sg=1, hs=0, seed=seed, workers=workers, hashfxn=_stable_hash)
    model.build_vocab(sentences)
    if not model.wv.index_to_key:
        raise ValueError(f"train_word2vec: no token occurs at least min_count={min_count} times in the texts")
    model.train(sentences, total_examples=model.corpus_count, epochs=epochs,
                callbacks=[_EpochProgress(epochs, progress)])
    words = [index for index, token in enumerate(model.wv.index_to_key) if not token.startswith("<label ")]
    embedding = Word2VecEmbedding(
        vocabulary=[PAD_TOKEN, UNK_TOKEN, *(model.wv.index_to_key[index] for index in words)],
        preprocessing=preprocessing, dim=dim, window=window, negative=negative, min_count=min_count, epochs=epochs,
        label_interval=label_interval, seed=seed,
    )
    embedding.vectors[2:] = model.wv.vectors[words]
    embedding.data_summary = {"texts": len(texts), "tokens": token_count}
    return embedding


def probe_words(embedding: Word2VecEmbedding, texts: Sequence[str], labels: Sequence[Any]) -> list[str]:
    """One token per class to judge the embedding by: the vocabulary token most typical of that class's texts.

    A token's score for a class is the number of the class's texts that contain it times the share of all texts
    containing it that are of that class, so a frequent word ("new", "size") shared by every class scores low
    and a person sees the neighbours of words like "sofa" or "drill". Classes in sorted order, no token twice;
    of tokens with equal scores the more frequent one (the lower vocabulary index) is taken.
    """
    texts_with: dict[int, Counter[Any]] = {}
    for text, label in zip(texts, labels, strict=True):
        for index in {embedding.encoder.index.get(token, UNK_INDEX) for token in embedding.encoder.tokenize(text)}:
            if index != UNK_INDEX:
                texts_with.setdefault(index, Counter())[label] += 1
    chosen: list[int] = []
    for label in sorted(set(labels), key=str):
        candidates = [index for index, counts in texts_with.items() if counts[label] and index not in chosen]
        if candidates:
            chosen.append(max(candidates, key=lambda i: (texts_with[i][label] ** 2 / texts_with[i].total(), -i)))
    return [embedding.vocabulary[index] for index in chosen]


def train_word2vec_on_split(
    train: Marketplace,
    preprocessor: TextPreprocessor | None = None,
    *,
    neighbours_of: Sequence[str] | None = None,
    **hyperparameters: Any,
) -> Word2VecEmbedding:
    """``train_word2vec`` on the texts (and, with ``label_interval`` > 0, the classes) of the training split only.

    ``data_summary`` gets the split's summary and a fingerprint of its products (checked by
    ``check_training_split`` before a classifier uses the embedding); ``metrics`` gets the nearest
    neighbours of ``neighbours_of`` (default: ``probe_words``, one per class), for a person to judge the vectors.
    """
    texts, labels = train.products["text"].tolist(), train.products["label"].tolist()
    embedding = train_word2vec(texts, preprocessor, labels=labels, **hyperparameters)
    embedding.data_summary = {
        **embedding.data_summary,
        "split": "train",
        "train_products": training_fingerprint(train.products["product_id"]),
        **train.summary(),
    }
    words = list(neighbours_of) if neighbours_of else probe_words(embedding, texts, labels)
    neighbours: dict[str, Any] = {}
    for word in words:
        try:
            neighbours[word] = [[token, round(similarity, 3)] for token, similarity in embedding.nearest(word, 8)]
        except KeyError as exc:
            neighbours[word] = str(exc.args[0])
    embedding.metrics = {"nearest_neighbours": neighbours}
    return embedding


def check_training_split(embedding: Word2VecEmbedding, train_product_ids: Iterable[Any]) -> None:
    """Refuse an embedding trained on other products than this training split: it may have read test listings."""
    recorded = embedding.data_summary.get("train_products")
    if recorded != training_fingerprint(train_product_ids):
        where = embedding.source.get("folder", "the in-memory embedding")
        raise CheckpointError(
            f"word2vec {where} was trained on a different set of products (fingerprint {recorded!r}) than this "
            "run's training split, so it may have seen validation or test text; retrain it with the same data "
            "and split arguments (scripts/train_word2vec.py, or --train-word2vec)"
        )


def plot_embedding_2d(
    embedding: Word2VecEmbedding,
    path: Path,
    *,
    n_words: int = 200,
    method: Literal["tsne", "pca"] = "tsne",
    seed: int = 0,
) -> Path:
    """Scatter the ``n_words`` most frequent tokens in 2-D (t-SNE or PCA), labelled, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

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

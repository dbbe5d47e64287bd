"""Training word2vec vectors (gensim skip-gram, negative sampling) on the training split's listing text only.

Word2vec learns its vocabulary from the data, so unlike the classifiers' ``train(model, ...)`` this module's
``train(splits, config)`` returns the new ``Word2VecEmbedding`` with its ``TrainResult``: the nearest neighbours
of a probe word per class (for a person to judge the vectors) and a 2-D picture of the most frequent tokens.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._progress import progress_bar
from ..data.dataset import Marketplace
from ..data.text import TextPreprocessor
from ..models.word2vec import PAD_TOKEN, UNK_INDEX, UNK_TOKEN, TokenEncoder, Word2VecEmbedding
from .distributed import DistributedContext
from .plots import plot_embedding_2d
from .runs import TrainResult

#: Nearest neighbours stored per probe word.
NEIGHBOURS = 8


@dataclass
class Word2VecTrainConfig:
    """The vectors' hyperparameters (recorded in the checkpoint) and what the run reports about them."""

    dim: int = field(default=128, metadata={"help": "vector dimension"})
    window: int = field(default=5, metadata={"help": "context window in tokens"})
    negative: int = field(default=10, metadata={"help": "negative samples per positive"})
    min_count: int = field(default=2, metadata={"help": "tokens seen fewer times in the training text become <unk>"})
    epochs: int = field(default=20, metadata={"help": "passes over the training text"})
    label_interval: int = field(default=3, metadata={
        "help": "read each training text's class as a pseudo-word every N tokens, so that words of one class get "
                "similar vectors; 0: plain word2vec"})
    stemmer: str = field(default="snowball", metadata={
        "choices": ["snowball", "porter", "none"], "help": "stemmer applied after stop-word removal"})
    workers: int = field(default=2, metadata={"help": "gensim worker threads (more than 1: runs not bit-identical)"})
    seed: int = 0
    neighbours: list[str] | None = field(default=None, metadata={
        "metavar": "WORD", "help": "words whose nearest neighbours are reported (default: the token most typical of "
                                   "each class's training texts)"})
    plot_words: int = field(default=200, metadata={"help": "most frequent tokens in embedding_2d.png"})
    plot_method: str = field(default="tsne", metadata={"choices": ["tsne", "pca"],
                                                        "help": "2-D projection of embedding_2d.png"})


def _stable_hash(text: str) -> int:
    """gensim seeds each word's initial vector with this; the built-in ``hash`` changes with every process."""
    return zlib.crc32(text.encode("utf-8"))


class _EpochProgress:
    """gensim callback that advances a progress bar once per word2vec epoch."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        self.bar = progress_bar(total=epochs, desc="word2vec epochs", disable=not enabled)

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


def train_vectors(
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
    ``label_interval`` tokens (see ``models.word2vec``); without ``labels``, or with ``label_interval`` 0, this
    is plain word2vec. ``preprocessor`` (default: ``TextPreprocessor()``) is stored in the checkpoint so the
    vocabulary is looked up exactly as it was built. With ``workers > 1`` gensim's threads make runs not
    bit-identical.
    """
    from gensim.models import Word2Vec  # the trainer is only needed here; gensim is slow to import

    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"train_vectors: {len(labels)} labels for {len(texts)} texts")
    if label_interval < 0:
        raise ValueError(f"train_vectors: label_interval must be 0 (off) or positive, not {label_interval}")
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
        raise ValueError(f"train_vectors: none of the {len(texts)} texts has a token after preprocessing")
    model = Word2Vec(vector_size=dim, window=window, negative=negative, min_count=min_count, epochs=epochs,
                     sg=1, hs=0, seed=seed, workers=workers, hashfxn=_stable_hash)
    model.build_vocab(sentences)
    if not model.wv.index_to_key:
        raise ValueError(f"train_vectors: no token occurs at least min_count={min_count} times in the texts")
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


def nearest_neighbours(embedding: Word2VecEmbedding, words: Sequence[str]) -> dict[str, Any]:
    """Each word's nearest tokens with their cosine similarity, or why the word has none."""
    neighbours: dict[str, Any] = {}
    for word in words:
        try:
            neighbours[word] = [[token, round(similarity, 3)]
                                for token, similarity in embedding.nearest(word, NEIGHBOURS)]
        except KeyError as exc:
            neighbours[word] = str(exc.args[0])
    return neighbours


def train(splits: dict[str, Marketplace], config: Word2VecTrainConfig,
          context: DistributedContext | None = None) -> tuple[Word2VecEmbedding, TrainResult]:
    """Word2vec on the texts (and, with ``label_interval`` > 0, the classes) of ``splits["train"]`` only.

    gensim trains in one process, with ``config.workers`` threads; ``context`` is accepted for the common shape.
    The result reports the nearest neighbours of ``config.neighbours`` (default: ``probe_words``, one per class)
    and draws ``embedding_2d.png``.
    """
    train_split = splits["train"]
    texts, labels = train_split.products["text"].tolist(), train_split.products["label"].tolist()
    preprocessor = TextPreprocessor(stemmer=None if config.stemmer == "none" else config.stemmer)  # type: ignore[arg-type]
    embedding = train_vectors(texts, preprocessor, labels=labels, label_interval=config.label_interval, dim=config.dim,
                              window=config.window, negative=config.negative, min_count=config.min_count,
                              epochs=config.epochs, seed=config.seed, workers=config.workers)
    words = config.neighbours or probe_words(embedding, texts, labels)
    figure = {"embedding_2d.png": lambda path: plot_embedding_2d(embedding, path, n_words=config.plot_words,
                                                                 method=config.plot_method,  # type: ignore[arg-type]
                                                                 seed=config.seed)}
    return embedding, TrainResult(metrics={"nearest_neighbours": nearest_neighbours(embedding, words)},
                                  figures=figure)

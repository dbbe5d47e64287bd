"""Train skip-gram word2vec on the training split's listing text and save it (default: checkpoints/word2vec).

Only the training products' text and classes are used, never validation or test listings, and the checkpoint
records a fingerprint of those products so that scripts/train_text_cnn.py can refuse an embedding from another
split. Each training text's class is read as a pseudo-word every --label-interval tokens, which makes the
vectors class-aware; --label-interval 0 trains plain word2vec.

Examples:
    python scripts/train_word2vec.py                     # the embedded sample (data/marketplace.db)
    python scripts/train_word2vec.py --db-url sqlite:///data/real.db --dim 128 --epochs 20
    python scripts/train_word2vec.py --neighbours sofa phone drill --plot-method pca
"""

from __future__ import annotations

import argparse
import logging
import sys

from marketplace_reco.data.errors import DataError
from marketplace_reco.data.text import TextPreprocessor
from marketplace_reco.models.errors import CheckpointError
from marketplace_reco.models.word2vec import plot_embedding_2d, train_word2vec, train_word2vec_on_split
from marketplace_reco.training.runs import (
    add_data_arguments,
    add_output_arguments,
    default_arguments,
    finish_run,
    load_splits,
    output_folder,
)

# The library's defaults are the script's defaults.
_DEFAULTS = default_arguments(train_word2vec)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train gensim Word2Vec (skip-gram, negative sampling) on the cleaned name + description of "
                    "the training products only, with their classes as pseudo-words (--label-interval). Writes "
                    "config.json (vocabulary, preprocessing, nearest neighbours), model.safetensors (vectors), "
                    "README.md and embedding_2d.png.",
    )
    add_data_arguments(parser)
    add_output_arguments(parser, "word2vec")
    group = parser.add_argument_group("word2vec")
    group.add_argument("--dim", type=int, default=_DEFAULTS["dim"], help="vector dimension (default: %(default)s)")
    group.add_argument("--window", type=int, default=_DEFAULTS["window"],
                       help="context window in tokens (default: %(default)s)")
    group.add_argument("--negative", type=int, default=_DEFAULTS["negative"],
                       help="negative samples per positive (default: %(default)s)")
    group.add_argument("--min-count", type=int, default=_DEFAULTS["min_count"],
                       help="tokens seen fewer times in the training text become <unk> (default: %(default)s)")
    group.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"],
                       help="passes over the training text (default: %(default)s)")
    group.add_argument("--label-interval", type=int, default=_DEFAULTS["label_interval"],
                       help="read each training text's class as a pseudo-word every N tokens, so that words of "
                            "one class get similar vectors; 0: plain word2vec (default: %(default)s)")
    group.add_argument("--workers", type=int, default=_DEFAULTS["workers"],
                       help="gensim worker threads (default: %(default)s)")
    group.add_argument("--stemmer", choices=("snowball", "porter", "none"), default="snowball",
                       help="stemmer applied after stop-word removal (default: %(default)s)")
    group = parser.add_argument_group("report")
    group.add_argument("--neighbours", nargs="+", default=None, metavar="WORD",
                       help="words whose nearest neighbours are printed and stored "
                            "(default: the token most typical of each class's training texts)")
    group.add_argument("--plot-words", type=int, default=200,
                       help="most frequent tokens in the plot (default: %(default)s)")
    group.add_argument("--plot-method", choices=("tsne", "pca"), default="tsne",
                       help="2-D projection of embedding_2d.png (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train = load_splits(args)["train"]
        embedding = train_word2vec_on_split(
            train, TextPreprocessor(stemmer=None if args.stemmer == "none" else args.stemmer),
            neighbours_of=args.neighbours, dim=args.dim, window=args.window, negative=args.negative,
            min_count=args.min_count, epochs=args.epochs, label_interval=args.label_interval, seed=args.seed,
            workers=args.workers,
        )
        folder = output_folder(args)
        plot_embedding_2d(embedding, folder / "embedding_2d.png", n_words=args.plot_words, method=args.plot_method,
                          seed=args.seed)
        finish_run(embedding, folder, metrics=embedding.metrics, data_summary=embedding.data_summary,
                   push_to=args.push_to, revision=args.revision)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"vocabulary: {len(embedding.vocabulary) - 2:,} tokens from {embedding.data_summary['texts']:,} training "
          f"texts ({embedding.data_summary['tokens']:,} tokens); plot: {folder / 'embedding_2d.png'}")
    for word, neighbours in embedding.metrics["nearest_neighbours"].items():
        shown = neighbours if isinstance(neighbours, str) else ", ".join(f"{t} {s:.2f}" for t, s in neighbours)
        print(f"  {word:>12}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

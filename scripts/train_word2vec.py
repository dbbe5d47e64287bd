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
import sys

from marketplace_reco.data import Marketplace
from marketplace_reco.models import Word2VecEmbedding
from marketplace_reco.training import TrainResult, runs, word2vec
from marketplace_reco.training.distributed import DistributedContext


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train gensim Word2Vec (skip-gram, negative sampling) on the cleaned name + description of "
                    "the training products only, with their classes as pseudo-words (--label-interval). Writes "
                    "config.json (vocabulary, preprocessing, nearest neighbours), model.safetensors (vectors), "
                    "README.md and embedding_2d.png, and prints each probe word's nearest neighbours.",
    )
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "word2vec")
    runs.add_config_arguments(parser, word2vec.Word2VecTrainConfig, "word2vec")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(word2vec.Word2VecTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext) -> tuple[Word2VecEmbedding, TrainResult]:
        embedding, result = word2vec.train(splits, config, context)
        print(f"vocabulary: {len(embedding.vocabulary) - 2:,} tokens from {embedding.data_summary['texts']:,} "
              f"training texts ({embedding.data_summary['tokens']:,} tokens)")
        for word, neighbours in result.metrics["nearest_neighbours"].items():
            shown = neighbours if isinstance(neighbours, str) else ", ".join(f"{t} {s:.2f}" for t, s in neighbours)
            print(f"  {word:>12}: {shown}")
        return embedding, result

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())

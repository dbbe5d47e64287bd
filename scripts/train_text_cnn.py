"""Train the text CNN over a word2vec embedding loaded by name, and save it (default: checkpoints/text-cnn).

The word2vec checkpoint (--word2vec, default "word2vec") must have been trained on this run's training
split (same data and split arguments): the script checks the products' fingerprint, so an embedding
that has read validation or test listings is refused. --train-word2vec trains it first, on this split,
with scripts/train_word2vec.py's default hyperparameters, and saves it under the --word2vec name.

Runs unchanged under torchrun (data-parallel; only rank 0 writes):
    python scripts/train_text_cnn.py --train-word2vec                   # the embedded sample
    python scripts/train_text_cnn.py --db-url sqlite:///data/real.db --word2vec word2vec-real
    torchrun --standalone --nproc_per_node 2 scripts/train_text_cnn.py --train-word2vec
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marketplace_reco.data import Marketplace
from marketplace_reco.models import TextCNN, Word2VecEmbedding
from marketplace_reco.settings import checkpoints_dir
from marketplace_reco.training import TrainResult, runs, text_cnn, word2vec
from marketplace_reco.training.distributed import DistributedContext

_MODEL = runs.default_arguments(TextCNN.__init__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Word2vec embedding -> convolutions of several widths, max-pooled over time -> dropout -> "
                    "feature layer -> classes, an ensemble of members trained one after the other with AdamW, "
                    "adversarial training on the word vectors, a one-cycle LR schedule and early stopping on "
                    "validation accuracy (each keeps its best epoch); the ensemble averages their probabilities "
                    "and is evaluated on the held-out test products. "
                    "Writes config.json, model.safetensors, README.md, confusion_matrix.png, training_curves.png "
                    "and history.json.",
    )
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "text-cnn")
    group = parser.add_argument_group("embedding")
    group.add_argument("--word2vec", default="word2vec",
                       help="word2vec checkpoint: a name under the checkpoints folder or a folder "
                            "(default: %(default)s)")
    group.add_argument("--train-word2vec", action="store_true",
                       help="first train the word2vec embedding on this run's training split and save it under "
                            "--word2vec (replacing it), instead of loading an existing one")
    group.add_argument("--fine-tune-embedding", action="store_true",
                       help="train the embedding with the rest of the network (default: frozen word2vec vectors)")
    group = parser.add_argument_group("model")
    group.add_argument("--max-length", type=int, default=_MODEL["max_length"],
                       help="tokens per text; longer texts are truncated (default: %(default)s)")
    group.add_argument("--kernel-sizes", type=int, nargs="+", default=list(_MODEL["kernel_sizes"]),
                       help="convolution widths in tokens (default: %(default)s)")
    group.add_argument("--num-filters", type=int, default=_MODEL["num_filters"],
                       help="filters per kernel width (default: %(default)s)")
    group.add_argument("--feature-dim", type=int, default=_MODEL["feature_dim"],
                       help="width of the feature layer reused by the fusion model (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=_MODEL["dropout"], help="dropout rate (default: %(default)s)")
    group.add_argument("--ensemble-size", type=int, default=_MODEL["ensemble_size"],
                       help="members trained with seeds seed, seed+1, ...; the model averages their probabilities "
                            "(default: %(default)s)")
    runs.add_config_arguments(parser, text_cnn.TextCNNTrainConfig, "training")
    return parser


def _word2vec(args: argparse.Namespace, splits: dict[str, Marketplace], context: DistributedContext
              ) -> Word2VecEmbedding:
    """Load the embedding by name; with --train-word2vec rank 0 trains and saves it first while the others wait."""
    if args.train_word2vec:
        if context.is_main:
            embedding, result = word2vec.train(splits, word2vec.Word2VecTrainConfig(seed=args.seed))
            # A bare name goes to the checkpoints folder, as scripts/train_word2vec.py --name does.
            folder = Path(args.word2vec)
            if folder.parent == Path("."):
                folder = checkpoints_dir() / args.word2vec
            runs.finish_run(embedding, folder, metrics=result.metrics,
                            data_summary={**embedding.data_summary, **runs.split_summary(splits, args.seed)},
                            figures=result.figures)
        context.barrier()
    embedding = Word2VecEmbedding.from_pretrained(args.word2vec)
    runs.check_same_split(embedding, splits, "word2vec embedding")
    return embedding


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(text_cnn.TextCNNTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext) -> tuple[TextCNN, TrainResult]:
        embedding = _word2vec(args, splits, context)
        model = TextCNN.from_word2vec(
            embedding, splits["train"].classes, max_length=args.max_length, kernel_sizes=args.kernel_sizes,
            num_filters=args.num_filters, feature_dim=args.feature_dim, dropout=args.dropout,
            fine_tune_embedding=args.fine_tune_embedding, ensemble_size=args.ensemble_size,
        )
        return model, text_cnn.train(model, splits, config, context)

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())

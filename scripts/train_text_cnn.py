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
import logging
import sys
import time
from pathlib import Path

import torch

from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.data.errors import DataError
from marketplace_reco.models.errors import CheckpointError
from marketplace_reco.models.text_cnn import TextCNN, members_history, train_text_cnn
from marketplace_reco.models.word2vec import (
    Word2VecEmbedding,
    check_training_split,
    plot_embedding_2d,
    train_word2vec_on_split,
)
from marketplace_reco.settings import checkpoints_dir
from marketplace_reco.training.distributed import DistributedContext, init_distributed
from marketplace_reco.training.metrics import evaluate
from marketplace_reco.training.runs import (
    add_data_arguments,
    add_output_arguments,
    add_training_arguments,
    default_arguments,
    finish_run,
    load_splits,
    output_folder,
    split_summary,
)

_MODEL = default_arguments(TextCNN.__init__)


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
    add_data_arguments(parser)
    add_output_arguments(parser, "text-cnn")
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
    group = add_training_arguments(parser, train_text_cnn, samples="texts",
                                   stops_without="a better validation accuracy (per member)")
    group.add_argument("--label-smoothing", type=float, default=default_arguments(train_text_cnn)["label_smoothing"],
                       help="share of each target spread over the other classes (default: %(default)s)")
    group.add_argument("--adversarial-epsilon", type=float,
                       default=default_arguments(train_text_cnn)["adversarial_epsilon"],
                       help="adversarial training: each text's word vectors are also moved this share of their norm "
                            "in the direction that raises the loss most; 0 turns it off and halves the training "
                            "time (default: %(default)s)")
    return parser


def _word2vec(
    args: argparse.Namespace, splits: dict[str, Marketplace], context: DistributedContext
) -> Word2VecEmbedding:
    """Load the embedding by name; with --train-word2vec rank 0 trains and saves it first while the others wait."""
    if args.train_word2vec:
        if context.is_main:
            embedding = train_word2vec_on_split(splits["train"], seed=args.seed)
            # A bare name goes to the checkpoints folder, as scripts/train_word2vec.py --name does.
            folder = Path(args.word2vec)
            if folder.parent == Path("."):
                folder = checkpoints_dir() / args.word2vec
            plot_embedding_2d(embedding, folder / "embedding_2d.png", seed=args.seed)
            finish_run(embedding, folder, metrics=embedding.metrics, data_summary=embedding.data_summary)
        context.barrier()
    embedding = Word2VecEmbedding.from_pretrained(args.word2vec)
    check_training_split(embedding, splits["train"].products["product_id"])
    return embedding  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    context = init_distributed()
    try:
        splits = load_splits(args)
        embedding = _word2vec(args, splits, context)
        torch.manual_seed(args.seed)
        model = TextCNN.from_word2vec(
            embedding, splits["train"].classes, max_length=args.max_length, kernel_sizes=args.kernel_sizes,
            num_filters=args.num_filters, feature_dim=args.feature_dim, dropout=args.dropout,
            fine_tune_embedding=args.fine_tune_embedding, ensemble_size=args.ensemble_size,
        )
        started = time.perf_counter()
        results = train_text_cnn(
            model, splits["train"].products["text"].tolist(), splits["train"].label_indices,
            splits["val"].products["text"].tolist(), splits["val"].label_indices,
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            patience=args.patience, label_smoothing=args.label_smoothing,
            adversarial_epsilon=args.adversarial_epsilon, seed=args.seed, context=context,
        )
        training_s = time.perf_counter() - started
        if context.is_main:
            test = splits["test"]
            texts = test.products["text"].tolist()
            metrics = evaluate(test.label_indices, model.predict_proba(texts=texts), model.classes, split="test")
            val = splits["val"]
            val_proba = model.predict_proba(texts=val.products["text"].tolist())
            metrics.update(
                best_epochs=[result.best_epoch for result in results],
                member_validation_accuracy=[result.history[result.best_epoch - 1]["val_accuracy"]
                                            for result in results],
                validation_accuracy=float((val_proba.argmax(axis=1) == val.label_indices).mean()),
                texts_without_known_word=int((model.known_token_counts(texts) == 0).sum()),
                training_s=round(training_s, 1),
                processes=context.world_size,
            )
            finish_run(model.cpu(), output_folder(args), metrics=metrics, data_summary=split_summary(splits, args.seed),
                       history=members_history(results), push_to=args.push_to, revision=args.revision)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

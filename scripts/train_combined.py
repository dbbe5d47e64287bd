"""Train the image + text fusion model from a trained image and text model; save it (default: checkpoints/fusion).

Both models are loaded by name (or folder, s3://..., Hugging Face repo id); their classification layers are
dropped, their feature vectors concatenated and a new head trained on top. They must have been trained on
this run's split (same data and split arguments), or the fusion model would be tested on products its
branches learned from: the script checks the split recorded in their checkpoints.

Examples:
    python scripts/train_combined.py                                     # checkpoints image-classifier + text-cnn
    python scripts/train_combined.py --image-model image-real --text-model text-cnn-real --db-url sqlite:///real.db
    python scripts/train_combined.py --unfreeze text                     # fine-tune the text CNN end to end too
    torchrun --standalone --nproc_per_node 2 scripts/train_combined.py
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from marketplace_reco.data.errors import DataError
from marketplace_reco.models.errors import CheckpointError
from marketplace_reco.models.fusion import BRANCHES, FusionClassifier, evaluate_fusion, train_fusion
from marketplace_reco.models.image_classifier import ImageClassifier
from marketplace_reco.models.text_cnn import TextCNN
from marketplace_reco.training.distributed import init_distributed
from marketplace_reco.training.feature_cache import FeatureCache, FeatureCacheError
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

_MODEL = default_arguments(FusionClassifier.__init__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Image classifier features ++ text CNN features (LayerNorm per branch) -> dropout -> linear "
                    "head, trained with modality dropout, AdamW, a one-cycle LR schedule and early stopping on "
                    "validation loss; one sample per photo with its product's text. Branches are frozen unless "
                    "--unfreeze names them (frozen branches' features are computed once and cached). Evaluated "
                    "per held-out test product (its photos' probabilities averaged). Writes config.json, "
                    "model.safetensors, README.md, confusion_matrix.png, training_curves.png and history.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runs unchanged under torchrun --nproc_per_node N (data-parallel; only rank 0 writes).",
    )
    add_data_arguments(parser)
    add_output_arguments(parser, "fusion")
    group = parser.add_argument_group("branches")
    group.add_argument("--image-model", default="image-classifier",
                       help="trained image classifier: checkpoint name, folder, s3://... or repo id "
                            "(default: %(default)s)")
    group.add_argument("--image-revision", default=None, help="revision of --image-model (default: latest)")
    group.add_argument("--text-model", default="text-cnn",
                       help="trained text CNN: checkpoint name, folder, s3://... or repo id (default: %(default)s)")
    group.add_argument("--text-revision", default=None, help="revision of --text-model (default: latest)")
    group.add_argument("--unfreeze", choices=BRANCHES, action="append", default=[],
                       help="fine-tune this branch end to end with the head (repeatable; default: both frozen)")
    group = parser.add_argument_group("head")
    group.add_argument("--dropout", type=float, default=_MODEL["dropout"],
                       help="dropout on the concatenated features (default: %(default)s)")
    group.add_argument("--modality-dropout", type=float, default=_MODEL["modality_dropout"],
                       help="share of training samples whose image features are hidden, and the same share whose "
                            "text features are hidden (default: %(default)s)")
    group = add_training_arguments(parser, train_fusion, samples="photo+text samples",
                                   stops_without="a lower validation loss")
    return parser


def _check_same_split(model: ImageClassifier | TextCNN, kind: str, summary: dict) -> None:
    """Refuse a branch trained on another split: its training products could be this run's test products."""
    recorded = {key: model.data_summary.get(key) for key in ("seed", "sizes")}
    if recorded != {key: summary[key] for key in ("seed", "sizes")}:
        raise CheckpointError(
            f"the {kind} model {model.source.get('folder', '')} was trained on another split (seed "
            f"{recorded['seed']}, sizes {recorded['sizes']}) than this run (seed {summary['seed']}, sizes "
            f"{summary['sizes']}); train it with the same data and split arguments"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    context = init_distributed()
    try:
        splits = load_splits(args)
        data_summary = split_summary(splits, args.seed)
        image_model = ImageClassifier.from_pretrained(args.image_model, revision=args.image_revision)
        text_model = TextCNN.from_pretrained(args.text_model, revision=args.text_revision)
        _check_same_split(image_model, "image", data_summary)
        _check_same_split(text_model, "text", data_summary)
        torch.manual_seed(args.seed)
        model = FusionClassifier.from_branches(image_model, text_model, unfrozen=args.unfreeze, dropout=args.dropout,
                                               modality_dropout=args.modality_dropout)
        started = time.perf_counter()
        with FeatureCache() as cache:
            result = train_fusion(model, splits["train"], splits["val"], epochs=args.epochs,
                                  batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
                                  patience=args.patience, cache=cache, seed=args.seed, context=context)
        training_s = time.perf_counter() - started
        if context.is_main:
            metrics = evaluate_fusion(model, splits["test"], "test")
            metrics.update(best_epoch=result.best_epoch,
                           validation_loss=result.history[result.best_epoch - 1]["val_loss"],
                           training_s=round(training_s, 1), processes=context.world_size)
            finish_run(model.cpu(), output_folder(args), metrics=metrics, data_summary=data_summary,
                       history=result.history, push_to=args.push_to, revision=args.revision)
    except (DataError, CheckpointError, FeatureCacheError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

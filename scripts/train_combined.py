"""Train the image + text fusion model from a trained image and text model; save it (default: checkpoints/fusion).

Both models are loaded by name (or folder, s3://..., Hugging Face repo id); the text model is any text classifier
(the text CNN, the transformer). The default late head weights the branches' calibrated log-probabilities per
class, fitted on the validation products; --head concat trains a linear head over the concatenated features
on the training products instead (with modality dropout; --unfreeze fine-tunes a branch with it). The branches
must have been trained on this run's split (same data and split arguments), or the fusion model would be tested
on products its branches learned from: the script checks the training products recorded in their checkpoints.

Examples:
    python scripts/train_combined.py                                     # checkpoints image-classifier + text-cnn
    python scripts/train_combined.py --image-model image-real --text-model text-cnn-real --db-url sqlite:///real.db
    python scripts/train_combined.py --head concat --unfreeze text       # fine-tune the text CNN end to end too
    torchrun --standalone --nproc_per_node 2 scripts/train_combined.py --head concat
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.data import Marketplace
from marketplace_reco.models import FusionClassifier, ImageClassifier, load_model
from marketplace_reco.models.fusion import BRANCHES, HEADS
from marketplace_reco.training import TrainResult, fusion, runs
from marketplace_reco.training.distributed import DistributedContext

_MODEL = runs.default_arguments(FusionClassifier.__init__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="An image classifier and a text model combined by a fusion head: late (default; per-class "
                    "weights of the branches' calibrated log-probabilities, fitted on the validation products) or "
                    "concat (their features LayerNorm-ed and concatenated, a linear head trained with modality "
                    "dropout, AdamW and early stopping; --unfreeze fine-tunes a branch with it). Evaluated per "
                    "held-out test product, each with all its photos and its text. Writes config.json, "
                    "model.safetensors, README.md, confusion_matrix.png (and, concat, training_curves.png).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runs unchanged under torchrun --nproc_per_node N (data-parallel; only rank 0 writes).",
    )
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "fusion")
    group = parser.add_argument_group("branches")
    group.add_argument("--image-model", default="image-classifier",
                       help="trained image classifier: checkpoint name, folder, s3://... or repo id "
                            "(default: %(default)s)")
    group.add_argument("--image-revision", default=None, help="revision of --image-model (default: latest)")
    group.add_argument("--text-model", default="text-cnn",
                       help="trained text model (text CNN or transformer): checkpoint name, folder, s3://... or repo "
                            "id (default: %(default)s)")
    group.add_argument("--text-revision", default=None, help="revision of --text-model (default: latest)")
    group.add_argument("--unfreeze", choices=BRANCHES, action="append", default=[],
                       help="concat head: fine-tune this branch end to end with the head (repeatable; default: both "
                            "frozen)")
    group = parser.add_argument_group("head")
    group.add_argument("--head", choices=HEADS, default=_MODEL["head"], help="fusion head (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=_MODEL["dropout"],
                       help="concat head: dropout on the concatenated features (default: %(default)s)")
    group.add_argument("--modality-dropout", type=float, default=_MODEL["modality_dropout"],
                       help="concat head: share of training samples whose image features are hidden, and the same "
                            "share whose text features are hidden (default: %(default)s)")
    runs.add_config_arguments(parser, fusion.FusionTrainConfig, "training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(fusion.FusionTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext) -> tuple[FusionClassifier, TrainResult]:
        image_model = ImageClassifier.from_pretrained(args.image_model, revision=args.image_revision)
        text_model = load_model(args.text_model, revision=args.text_revision)
        runs.check_same_split(image_model, splits, "image model")
        runs.check_same_split(text_model, splits, "text model")
        model = FusionClassifier.from_branches(image_model, text_model, head=args.head, unfrozen=args.unfreeze,
                                               dropout=args.dropout, modality_dropout=args.modality_dropout)
        return model, fusion.train(model, splits, config, context)

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())

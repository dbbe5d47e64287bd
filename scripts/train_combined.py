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
import sys

from marketplace_reco.data import Marketplace
from marketplace_reco.models import FusionClassifier, ImageClassifier, TextCNN
from marketplace_reco.models.fusion import BRANCHES
from marketplace_reco.training import TrainResult, fusion, runs
from marketplace_reco.training.distributed import DistributedContext

_MODEL = runs.default_arguments(FusionClassifier.__init__)


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
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "fusion")
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
    runs.add_config_arguments(parser, fusion.FusionTrainConfig, "training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(fusion.FusionTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext) -> tuple[FusionClassifier, TrainResult]:
        image_model = ImageClassifier.from_pretrained(args.image_model, revision=args.image_revision)
        text_model = TextCNN.from_pretrained(args.text_model, revision=args.text_revision)
        runs.check_same_split(image_model, splits, "image model")
        runs.check_same_split(text_model, splits, "text model")
        model = FusionClassifier.from_branches(image_model, text_model, unfrozen=args.unfreeze, dropout=args.dropout,
                                               modality_dropout=args.modality_dropout)
        return model, fusion.train(model, splits, config, context)

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())

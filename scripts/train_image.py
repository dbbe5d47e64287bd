"""Train the photo classifier (timm backbone, transfer learning) and save it (default: checkpoints/image-classifier).

The backbone starts from timm's pretrained weights (fetched by its timm name, e.g. from the Hugging Face Hub's
timm/<name> repository; a name with a pretrained tag such as tf_efficientnet_lite0.in1k picks those weights)
unless --no-pretrained is given or --weights names a local state dict. Its last --trainable-blocks blocks train;
the frozen trunk before them runs once per photo and view (the plain photo and --augmented-views augmented
ones) and its outputs are cached, so epochs only run the trainable part. With --augment every epoch runs the
whole network on fresh augmentations instead. The probabilities are calibrated on the validation photos.

Examples:
    python scripts/train_image.py                                    # resnet50, pretrained (needs the internet)
    python scripts/train_image.py --backbone tf_efficientnet_lite0.in1k --augmented-views 4
    python scripts/train_image.py --weights resnet50.safetensors     # pretrained weights from a local file
    python scripts/train_image.py --no-pretrained --backbone resnet18 --trainable-blocks all --augment \\
        --augmented-views 0 --image-size 128 --epochs 30             # from scratch (what CPUs can afford)
    torchrun --standalone --nproc_per_node 2 scripts/train_image.py --no-pretrained --backbone resnet10t
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marketplace_reco.data import Marketplace
from marketplace_reco.models import DEFAULT_RETRIEVAL, ImageClassifier
from marketplace_reco.training import TrainResult, image_classifier, runs
from marketplace_reco.training.distributed import DistributedContext

_MODEL = runs.default_arguments(ImageClassifier.__init__)


def _trainable_blocks(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number of blocks, not {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="timm backbone with its last blocks trainable (the rest frozen), a feature layer and a "
                    "linear head, trained on the training products' photos with AdamW, a one-cycle LR schedule, "
                    "label smoothing and early stopping on validation loss, then calibrated (temperature) on the "
                    "validation photos; the best epoch is evaluated on the held-out test products (a product's "
                    "photos' probabilities are averaged). Writes config.json, model.safetensors, README.md, "
                    "confusion_matrix.png, training_curves.png and history.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runs unchanged under torchrun --nproc_per_node N (data-parallel; only rank 0 writes).",
    )
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "image-classifier")
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default=_MODEL["backbone"],
                       help="any timm model name, with a pretrained tag or not, e.g. resnet50, "
                            "tf_efficientnet_lite0.in1k, convnext_atto.d2_in1k (default: %(default)s)")
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--no-pretrained", action="store_true",
                         help="start from random weights instead of timm's pretrained ones")
    weights.add_argument("--weights", type=Path, default=None, metavar="FILE",
                         help="pretrained weights from a local safetensors file (a timm or torchvision state dict "
                              "of the same backbone) instead of downloading them")
    group.add_argument("--trainable-blocks", type=_trainable_blocks, default=_MODEL["trainable_blocks"],
                       help="how many of the backbone's last blocks train (timm's grouping: ResNet-50's layer4.2, "
                            "layer4.1, ...; EfficientNet's blocks.6.0 with conv_head, blocks.5.3, ...), 0 for a "
                            "frozen backbone (only the feature layer and head train), or 'all' (default: %(default)s)")
    group.add_argument("--image-size", type=int, default=None,
                       help="photos are letterboxed to this square size (default: the backbone's, 224 for resnet50)")
    group = parser.add_argument_group("model")
    group.add_argument("--feature-dim", type=int, default=_MODEL["feature_dim"],
                       help="width of the feature layer reused by the fusion model (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=_MODEL["dropout"],
                       help="dropout before the head (default: %(default)s)")
    group.add_argument("--flip-averaging", action=argparse.BooleanOptionalAction, default=_MODEL["flip_averaging"],
                       help="predict from the mean logits of each photo and its mirror image, in evaluation and "
                            "serving alike (default: %(default)s)")
    group.add_argument("--retrieval-dim", type=int, default=DEFAULT_RETRIEVAL["dim"],
                       help="width of the similar-listing vectors (several backbone stages and a colour histogram, "
                            "with a learned whitening fitted on the training listings' photo pairs); 0: the "
                            "pooled backbone output instead (default: %(default)s)")
    runs.add_config_arguments(parser, image_classifier.ImageTrainConfig, "training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(image_classifier.ImageTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext) -> tuple[ImageClassifier, TrainResult]:
        model = ImageClassifier(
            splits["train"].classes, backbone=args.backbone, trainable_blocks=args.trainable_blocks,
            feature_dim=args.feature_dim, dropout=args.dropout, flip_averaging=args.flip_averaging,
            preprocessing={"image_size": args.image_size} if args.image_size else None,
            pretrained=str(args.weights) if args.weights else not args.no_pretrained,
            retrieval={"dim": args.retrieval_dim} if args.retrieval_dim else None,
        )
        return model, image_classifier.train(model, splits, config, context)

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune a pretrained transformer encoder on the listing texts and save it (default: checkpoints/text-transformer).

The encoder and its tokenizer are loaded by Hugging Face hub id or from a folder (--encoder, default
sentence-transformers/all-MiniLM-L6-v2); the saved checkpoint holds everything (encoder configuration and weights,
head, tokenizer), so loading it needs no network. Offline, lay out the pretrained encoder first:
    eval "$(bash ../shared/pretrained/setup_hf_cache.sh)"

Runs unchanged under torchrun (data-parallel; only rank 0 writes):
    python scripts/train_text_transformer.py                                # the embedded sample
    python scripts/train_text_transformer.py --db-url sqlite:///data/real.db --name text-transformer-real
    python scripts/train_text_transformer.py --trainable-layers 2 --epochs 3   # the last two layers and the head
    torchrun --standalone --nproc_per_node 2 scripts/train_text_transformer.py
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.data import Marketplace
from marketplace_reco.models import TextTransformerClassifier
from marketplace_reco.training import TrainResult, runs, text_transformer
from marketplace_reco.training.distributed import DistributedContext

_MODEL = runs.default_arguments(TextTransformerClassifier.__init__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrained transformer encoder over the listing text's word pieces (head + tail truncated) -> "
                    "mean pooling -> dropout -> feature layer -> classes, fine-tuned with AdamW, a linear warm-up "
                    "and decay, label smoothing, bf16 autocast and early stopping on validation (keeping the best "
                    "epoch), calibrated by a temperature fitted on validation texts and evaluated on the held-out "
                    "test products. Writes config.json, model.safetensors, tokenizer/, README.md, "
                    "confusion_matrix.png, training_curves.png and history.json.",
    )
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "text-transformer")
    group = parser.add_argument_group("model")
    group.add_argument("--encoder", default=_MODEL["encoder"],
                       help="pretrained encoder and tokenizer: Hugging Face hub id or folder (default: %(default)s)")
    group.add_argument("--max-length", type=int, default=_MODEL["max_length"],
                       help="word pieces per text, special tokens included (default: %(default)s)")
    group.add_argument("--head-length", type=int, default=_MODEL["head_length"],
                       help="a longer text keeps this many word pieces from its start and the rest from its end "
                            "(default: %(default)s)")
    group.add_argument("--pooling", choices=["mean", "cls"], default=_MODEL["pooling"],
                       help="how the word pieces' states become one vector (default: %(default)s)")
    group.add_argument("--feature-dim", type=int, default=_MODEL["feature_dim"],
                       help="width of the feature layer reused by the fusion model (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=_MODEL["dropout"],
                       help="dropout before the feature layer and the classifier (default: %(default)s)")
    group.add_argument("--lexical-features", type=int, default=_MODEL["lexical_features"],
                       help="hashed word 1-2-gram TF-IDF features of a linear lexical head whose scores join the "
                            "logits, fitted after the encoder (0: none; default: %(default)s)")
    runs.add_config_arguments(parser, text_transformer.TextTransformerTrainConfig, "training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(text_transformer.TextTransformerTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext
            ) -> tuple[TextTransformerClassifier, TrainResult]:
        model = TextTransformerClassifier(
            splits["train"].classes, encoder=args.encoder, max_length=args.max_length, head_length=args.head_length,
            pooling=args.pooling, feature_dim=args.feature_dim, dropout=args.dropout,
            lexical_features=args.lexical_features,
        )
        return model, text_transformer.train(model, splits, config, context)

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())

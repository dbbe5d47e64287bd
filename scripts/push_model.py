"""Push a checkpoint to a hub: a local folder or name, an S3 bucket, or the Hugging Face Hub.

The source may itself be on any hub, so this also copies a checkpoint from one hub to another.

Examples:
    python scripts/push_model.py hog-svm s3://models-bucket/marketplace/hog-svm --revision v1
    python scripts/push_model.py checkpoints/hog-svm my-org/hog-svm --revision v1
    python scripts/push_model.py my-org/hog-svm s3://models-bucket/marketplace/hog-svm --source-revision v1
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.models import CheckpointError, push_checkpoint, resolve_checkpoint

_TARGETS = (
    "Checkpoint references: s3://bucket/prefix/name (S3, configured by the AWS_* environment); file://path, an "
    "absolute path or ./path (a local folder); a bare name such as hog-svm (a folder in the checkpoints folder, "
    "$MARKETPLACE_CHECKPOINTS or checkpoints/); org/repo (the Hugging Face Hub, $HF_ENDPOINT and $HF_TOKEN)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Upload a checkpoint (config.json, model.safetensors, README.md and the files beside them) "
                    "to a hub at a revision: a branch on the Hugging Face Hub (created if new), "
                    "prefix/name/<revision>/ on S3, name@<revision> in a local folder (main: name itself). "
                    "Prints the resolved revision (commit sha, S3 revision, local content hash).",
        epilog=_TARGETS,
    )
    parser.add_argument("source", help="the checkpoint to push: a local name or folder, or any hub reference")
    parser.add_argument("target", help="where to push it (a hub reference)")
    parser.add_argument("--revision", default=None, help="revision to push to (default: main)")
    parser.add_argument("--source-revision", default=None, help="revision of a remote source (default: main)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        source = resolve_checkpoint(args.source, revision=args.source_revision)
        revision = push_checkpoint(source.folder, args.target, revision=args.revision)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pushed {args.source} ({source.revision}) to {args.target} at revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pull a checkpoint from a hub (local, S3 or the Hugging Face Hub) into a local folder, verifying every file.

Examples:
    python scripts/pull_model.py s3://models-bucket/marketplace/hog-svm checkpoints/hog-svm --revision v1
    python scripts/pull_model.py my-org/hog-svm ./hog-svm-v1 --revision v1
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.models import DEFAULT_REVISION, CheckpointError, pull_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download a checkpoint at a revision and copy it into DESTINATION (replaced if it exists). "
                    "Every file is checked against the sha256 (or git blob id) the hub reports; a file that did "
                    "not arrive whole stops the pull with an error naming it.",
        epilog="Sources: s3://bucket/prefix/name, org/repo (Hugging Face Hub: $HF_ENDPOINT, $HF_TOKEN), a bare "
               "checkpoint name or a folder path.",
    )
    parser.add_argument("source", help="the checkpoint to pull (a hub reference)")
    parser.add_argument("destination", help="local folder to write the checkpoint into")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit (Hugging Face), revision name (S3, local); default: main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        folder = pull_checkpoint(args.source, args.destination, revision=args.revision)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pulled {args.source} at revision {args.revision or DEFAULT_REVISION} into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

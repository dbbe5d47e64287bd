"""Upload a local folder of photos (<image id>.jpg) to an S3 bucket, or to any other image store location.

Example:
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python scripts/upload_images.py data/images s3://my-bucket/images

The bucket must exist. Endpoint, region and credentials come from the standard AWS environment variables.
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.data.errors import DataError
from marketplace_reco.data.image_store import LocalImageStore, copy_images, open_image_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Copy every <image id>.jpg of a local folder to an image store, concurrently, with a "
                    "progress bar. Keys are <prefix>/<image id>.jpg, the layout the project reads from.",
    )
    parser.add_argument("source", help="local folder holding <image id>.jpg files")
    parser.add_argument("target", help="destination, normally s3://bucket/prefix (a folder also works)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="do not upload photos the target already holds (to resume an interrupted upload)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent uploads (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        source = LocalImageStore(args.source)
        target = open_image_store(args.target, create=True)
        copied = copy_images(source, target, skip_existing=args.skip_existing, max_workers=args.workers,
                             progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"uploaded {copied:,} photo(s) from {source.location} to {target.location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

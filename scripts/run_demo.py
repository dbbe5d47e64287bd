"""The main job on the embedded default data: sample marketplace -> four trained models -> API.

Each step is the same script a user runs by hand (shown before it runs), with small CPU-sized settings so
the whole job fits in a few minutes on a 2-core machine. The image model is trained from scratch with a
small backbone here (`--no-pretrained`): pretrained weights are the real default of `train_image.py`,
but a fresh machine may not reach them and a from-scratch ResNet-50 is far too slow on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from marketplace_reco.settings import checkpoints_dir, default_db_url, default_image_location

SCRIPTS = Path(__file__).resolve().parent
MODEL_NAMES = ("hog-svm", "word2vec", "text-cnn", "image-classifier", "fusion")


def _steps(skip_sample: bool) -> list[list[str]]:
    steps = [] if skip_sample else [["make_sample_data.py", "--no-progress"]]
    return steps + [
        ["train_hog_svm.py"],
        ["train_word2vec.py", "--plot-method", "pca"],
        ["train_text_cnn.py", "--epochs", "30"],
        ["train_image.py", "--no-pretrained", "--backbone", "resnet10t", "--trainable-blocks", "all",
         "--image-size", "64", "--epochs", "12"],
        ["train_combined.py"],
    ]


def _run(step: list[str]) -> None:
    command = [sys.executable, str(SCRIPTS / step[0]), *step[1:]]
    print(f"\n$ python scripts/{step[0]} {shlex.join(step[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: step 'scripts/{step[0]}' failed with exit code {result.returncode}; "
                         "see its output above")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def _summary_table() -> str:
    rows = ["| model | held-out accuracy | macro-F1 |", "| --- | --- | --- |"]
    for name in MODEL_NAMES:
        metrics = json.loads((checkpoints_dir() / name / "config.json").read_text(encoding="utf-8")).get("metrics", {})
        if "accuracy" in metrics:
            rows.append(f"| {name} | {metrics['accuracy']:.3f} | {metrics['macro_f1']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8008, help="port of the API (default: %(default)s)")
    parser.add_argument("--no-serve", action="store_true", help="stop after training instead of starting the API")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    # The sample generator refuses a database holding other products, so a second run reuses the first sample.
    sample_db = Path(str(default_db_url()).removeprefix("sqlite:///"))
    skip_sample = sample_db.exists() and Path(default_image_location()).exists()
    for step in _steps(skip_sample):
        _run(step)
    print(f"\nTrained on the sample marketplace in {time.perf_counter() - started:.0f} s:\n{_summary_table()}\n")
    if args.no_serve:
        return 0
    serve = [sys.executable, str(SCRIPTS / "serve.py"), "--port", str(args.port),
             "--image-model", "image-classifier", "--text-model", "text-cnn", "--combined-model", "fusion"]
    photos = sorted(Path(default_image_location()).glob("*.jpg"))
    if photos:  # the printed example requests then run as pasted
        serve += ["--example-photo", os.path.relpath(photos[0])]
    print(f"$ python scripts/serve.py {shlex.join(serve[2:])}", flush=True)
    return subprocess.call(serve)


if __name__ == "__main__":
    raise SystemExit(main())

"""The image training script under torchrun: 2 CPU processes (gloo), sharded photos, one checkpoint from rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from marketplace_reco.models import load_model
from marketplace_reco.models.image_classifier import ImageClassifier

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_train_image_runs_unchanged_under_torchrun_with_two_processes(sample_data: dict[str, str],
                                                                       tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "MARKETPLACE_CHECKPOINTS": str(checkpoints), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "scripts/train_image.py", "--db-url", sample_data["db_url"], "--images", sample_data["image_location"],
        "--no-pretrained", "--backbone", "test_resnet", "--image-size", "32", "--epochs", "2", "--patience", "2",
        "--batch-size", "16", "--name", "image-ddp",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # Only rank 0 evaluates and saves: one report, one checkpoint.
    assert result.stdout.count("checkpoint: ") == 1
    assert [p.name for p in checkpoints.iterdir()] == ["image-ddp"]

    model = load_model(str(checkpoints / "image-ddp"))
    assert isinstance(model, ImageClassifier)
    assert model.metrics["processes"] == 2 and model.metrics["feature_cache"] is True
    assert model.metrics["unit"] == "products" and 0.0 <= model.metrics["accuracy"] <= 1.0
    # Every rank fitted the same similar-listing whitening (the script's default) on all the training pairs.
    assert model.embedding_dim == 512 and model.metrics["retrieval"]["pairs"] > 0
    history = json.loads((checkpoints / "image-ddp" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]

"""scripts/evaluate.py end to end: checkpoints by name scored per product on a database or on a CSV export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marketplace_reco.data import Marketplace, load_marketplace
from marketplace_reco.models import HogSvmClassifier, TextCNN, TextTransformerClassifier
from marketplace_reco.training.hog_svm import fit
from marketplace_reco.training.image_data import SplitImages
from marketplace_reco.training.word2vec import train_vectors
from test_text_transformer import make_encoder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


@pytest.fixture(scope="module")
def checkpoints(sample_marketplace: Marketplace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo model and a text model of the sample's classes, quickly fitted, saved by name."""
    folder = tmp_path_factory.mktemp("checkpoints")
    train = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)["train"]
    images = SplitImages.from_split(train, "train")
    hog = HogSvmClassifier(train.classes, preprocessing={"image_size": 32}, pixels_per_cell=[8], lbp_grid=0)
    encoded = train.image_store.get_many(images.image_ids)
    fit(hog, hog.extract_features([encoded[i] for i in images.image_ids]), images.image_labels)
    hog.save_pretrained(folder / "hog-svm")
    embedding = train_vectors(train.products["text"].tolist(), dim=8, epochs=2, min_count=1, workers=1,
                              progress=False)
    TextCNN.from_word2vec(embedding, train.classes, num_filters=4, feature_dim=4, ensemble_size=1,
                          max_length=32).save_pretrained(folder / "text-cnn")
    return folder


def _evaluate(checkpoints: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MARKETPLACE_CHECKPOINTS": str(checkpoints)}, check=False)


def test_scores_named_checkpoints_on_a_split_of_a_database(checkpoints: Path, sample_data: dict[str, str],
                                                           tmp_path: Path) -> None:
    result = _evaluate(checkpoints, "hog-svm", "text-cnn", "--db-url", sample_data["db_url"], "--images",
                       sample_data["image_location"], "--split", "test", "--val-fraction", "0.2", "--test-fraction",
                       "0.2", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    test = load_marketplace(**sample_data).split((0.6, 0.2, 0.2), seed=0)["test"]
    assert "split test" in result.stdout and f"; {len(test.products)} products." in result.stdout
    for name, products in (("hog-svm", len(SplitImages.from_split(test, "test").product_ids)),
                           ("text-cnn", len(test.products))):
        metrics = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert metrics["n_samples"] == products and metrics["unit"] == "products"
        assert metrics["model"]["name"] == name and len(metrics["model"]["revision"]) == 12
        assert (tmp_path / "out" / name / "confusion_matrix.png").stat().st_size > 1000
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {name} "))
        assert f"{metrics['accuracy']:.4f}" in row and f"{metrics['macro_f1']:.4f}" in row


def test_scores_a_csv_export_of_real_listings(checkpoints: Path, shared_marketplace: Path, tmp_path: Path) -> None:
    """A small subset of the real export, imported on the fly (--data), with the users' dirty text as it is."""
    export = tmp_path / "export"
    export.mkdir()
    # Every record of the export is one line ending in \n (its descriptions hold bare \r, kept as they are).
    lines = (shared_marketplace / "products.csv").read_bytes().split(b"\n")[:61]  # the header and 60 products
    (export / "products.csv").write_bytes(b"\n".join(lines) + b"\n")
    ids = {line.split(b",")[1] for line in lines[1:]}
    images = [line for i, line in enumerate((shared_marketplace / "images.csv").read_bytes().split(b"\n"))
              if i == 0 or (line and line.split(b",")[2] in ids)]
    (export / "images.csv").write_bytes(b"\n".join(images) + b"\n")
    (export / "images").symlink_to(shared_marketplace / "images")
    result = _evaluate(checkpoints, "hog-svm", "text-cnn", "--data", str(export), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "60 products" in result.stdout
    assert json.loads((tmp_path / "out" / "text-cnn" / "metrics.json").read_text())["n_samples"] == 60


def test_an_unknown_model_is_one_line_of_error(checkpoints: Path, sample_data: dict[str, str]) -> None:
    result = _evaluate(checkpoints, "no-such-model", "--db-url", sample_data["db_url"], "--images",
                       sample_data["image_location"])
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_scores_the_quantized_form_a_server_would_run(checkpoints: Path, sample_marketplace: Marketplace,
                                                      sample_data: dict[str, str], tmp_path: Path) -> None:
    train = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)["train"]
    encoder = make_encoder(tmp_path / "encoder", train.products["text"])
    served = tmp_path / "checkpoints"
    TextTransformerClassifier(train.classes, encoder=str(encoder), max_length=32, head_length=24, feature_dim=8,
                              lexical_features=256).save_pretrained(served / "text-transformer")
    (served / "text-cnn").symlink_to(checkpoints / "text-cnn")
    result = _evaluate(served, "text-transformer", "text-cnn", "--db-url", sample_data["db_url"], "--images",
                       sample_data["image_location"], "--quantization", "int8", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    quantized = json.loads((tmp_path / "out" / "text-transformer_int8" / "metrics.json").read_text())
    assert quantized["model"]["quantization"] == "int8" and quantized["n_samples"] == len(sample_marketplace.products)
    assert next(line for line in result.stdout.splitlines() if line.startswith("| text-transformer (int8) "))
    # The text CNN has no layer int8 pays for: it is scored as it is, and labelled so.
    as_it_is = json.loads((tmp_path / "out" / "text-cnn" / "metrics.json").read_text())
    assert as_it_is["model"]["quantization"] is None

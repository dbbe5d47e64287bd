"""scripts/bench_search.py end to end on tiny sizes, against the tests' pgvector server: every section is measured
and reported, the saved-and-loaded index answers as before, and same-listing recall asks only listings the image
model was not trained on (the numbers themselves belong to the benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from marketplace_reco.data.dataset import Marketplace

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "bench_search.py"


def test_the_benchmark_reports_every_section(pgvector_url: str, tmp_path: Path) -> None:
    report = tmp_path / "bench_search.md"
    result = subprocess.run([
        sys.executable, str(SCRIPT), "--n", "3000", "--dim", "32", "--queries", "20", "--latency-queries", "5",
        "--ef-search", "16", "64",
        "--crossover-dims", "16", "--crossover-sizes", "100", "200", "--pg-n", "400", "--pg-url", pgvector_url,
        "--pg-ef-search", "40", "--pg-memory", "64MB", "--pg-workers", "0", "--output", str(report),
    ], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    for heading in ("## 1. Exact search", "## 2. FAISS at 3,000 vectors of dim 32", "## 3. pgvector at 400 vectors"):
        assert heading in text
    assert "| from_pretrained |" in text and "| True |" in text
    assert "| exact (IndexFlatIP) | - |" in text and "| HNSW M=32 efC=200 | 64 |" in text
    assert "pgvector 0.6" in text and "| HNSW m=16 ef_construction=64 | 40 |" in text


def test_the_retrieval_section_measures_the_models_on_listings(embedding_checkpoints: Path,
                                                               sample_data: dict[str, str], tmp_path: Path) -> None:
    report = tmp_path / "bench_search_retrieval.md"
    result = subprocess.run([
        sys.executable, str(SCRIPT), "--skip-scale", "--db-url", sample_data["db_url"],
        "--images", sample_data["image_location"], "--image-model", str(embedding_checkpoints / "image-classifier"),
        "--text-model", str(embedding_checkpoints / "text-cnn"), "--http-listings", "2000", "--latency-queries", "10",
        "--output", str(report),
    ], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert "## 1." not in text and "## 4. Retrieval quality on real listings" in text
    for heading in ("Same-listing recall", "Category precision@10", "Query latency, text index of 2,000 listings",
                    "Build time"):
        assert heading in text
    assert "| image | 130 |" in text and "| text | 130 |" in text and "| fusion | 130 |" in text
    assert "| by listing id | 10 |" in text and "| by text | 10 |" in text


def test_same_listing_recall_asks_only_listings_the_image_model_was_not_trained_on(
        sample_data: dict[str, str], sample_marketplace: Marketplace, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    model = tmp_path / "image"
    subprocess.run([
        sys.executable, str(REPO_ROOT / "scripts" / "train_image.py"), "--db-url", sample_data["db_url"],
        "--images", sample_data["image_location"], "--no-pretrained", "--backbone", "test_resnet", "--image-size",
        "32", "--epochs", "1", "--retrieval-dim", "16", "--output", str(model),
    ], env=env, capture_output=True, text=True, timeout=600, check=True)
    report = tmp_path / "bench_search_retrieval.md"
    result = subprocess.run([
        sys.executable, str(SCRIPT), "--skip-scale", "--db-url", sample_data["db_url"],
        "--images", sample_data["image_location"], "--image-model", str(model), "--http-listings", "500",
        "--latency-queries", "5", "--output", str(report),
    ], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert "Queries: photos of the listings the image model was not trained on" in text
    # The queries: every photo of a validation or test listing with two or more photos (the script's 0.8/0.1/0.1).
    splits = sample_marketplace.split((0.8, 0.1, 0.1), seed=0)
    held_out = pd.concat([splits["val"].images_frame(), splits["test"].images_frame()])
    per_listing = held_out.groupby("product_id").size()
    queries = int(per_listing[per_listing >= 2].sum())
    assert f"| {queries} |" in text.split("### Same-listing recall")[1].split("###")[0]

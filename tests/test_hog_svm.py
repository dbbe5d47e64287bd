"""The HOG + linear SVM baseline: transformer, training, calibration, checkpoints and the training script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sklearn.base import clone

from marketplace_reco.data.sample import make_sample_marketplace
from marketplace_reco.models import CheckpointError, ModelConfigError, create_model, load_model
from marketplace_reco.models.hog_svm import HogSvmClassifier, HOGTransformer
from marketplace_reco.training.calibration import fit_temperature
from marketplace_reco.training.hog_svm import fit

CLASSES = ["horizontal", "vertical", "diagonal"]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _photo(label: int, rng: np.random.Generator) -> Image.Image:
    """Stripes whose direction is the class, on a random colour, at a random size and phase."""
    width, height = (int(v) for v in rng.integers(48, 96, size=2))
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 120, size=3)))
    draw = ImageDraw.Draw(img)
    offset = int(rng.integers(0, 8))
    for i in range(-height, width + height, 8):
        start, end = {0: ((0, i + offset), (width, i + offset)), 1: ((i + offset, 0), (i + offset, height)),
                      2: ((i + offset, 0), (i + offset + height, height))}[label]
        draw.line([start, end], fill=(230, 230, 230), width=3)
    return img


def _dataset(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    return [_photo(label, rng) for label in labels], labels


@pytest.fixture(scope="module")
def trained() -> HogSvmClassifier:
    images, labels = _dataset(60, seed=0)
    val_images, val_labels = _dataset(24, seed=1)
    model = create_model("hog-svm", classes=CLASSES, preprocessing={"image_size": 64}, pixels_per_cell=[8, 16],
                         colour_bins=4, C=0.1)
    assert isinstance(model, HogSvmClassifier)
    return fit(model, model.extract_features(images), labels, model.extract_features(val_images), val_labels)


def test_hog_step_is_a_scikit_learn_transformer() -> None:
    step = HOGTransformer(image_size=32, pixels_per_cell=(8,), colour_bins=2, lbp_grid=2)
    copy = clone(step)
    assert copy.get_params() == step.get_params()
    images, _ = _dataset(3, seed=2)
    encoded = []
    for img in images:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    features = copy.fit_transform(images)
    # 3x3 blocks of 2x2 cells of 9 bins, 2x2x2 colour bins, then 10 LBP codes for the photo and 4 grid cells.
    assert features.shape == (3, 3 * 3 * 4 * 9 + 8 + 5 * 10) == (3, step.n_features)
    np.testing.assert_array_equal(step.transform(encoded), features)  # bytes decode to the same pixels
    colour, texture = features[:, 324:332], features[:, 332:].reshape(3, 5, 10)
    np.testing.assert_allclose(np.sum(colour**2, axis=1), 1.0, rtol=1e-5)  # square root of a histogram
    np.testing.assert_allclose(texture.sum(axis=2), 1.0, rtol=1e-5)  # one normalised histogram per region
    assert step.transform([]).shape == (0, step.n_features)


def test_training_learns_the_stripes_and_ranks_all_classes(trained: HogSvmClassifier) -> None:
    images, labels = _dataset(30, seed=3)
    proba = trained.predict_proba(images=images)
    assert proba.shape == (30, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (proba.argmax(axis=1) == np.array(labels)).mean() >= 0.9
    assert trained.temperature != 1.0  # fitted on the validation photos
    config = trained.config
    assert config["n_features"] == trained.n_features == 2 * 2 * 9 * (7 * 7 + 3 * 3) + 4**3 + 5 * 10
    assert config["preprocessing"] == {"resize": "letterbox", "image_size": 64, "fill": [0, 0, 0]}


def test_untrained_model_is_uniform_and_training_needs_every_class() -> None:
    model = create_model("hog-svm", classes=CLASSES, preprocessing={"image_size": 32})
    assert isinstance(model, HogSvmClassifier)
    images, labels = _dataset(6, seed=4)
    np.testing.assert_allclose(model.predict_proba(images=images), 1 / 3)
    with pytest.raises(ModelConfigError, match=r"classes without examples: \['diagonal'\]"):
        fit(model, model.extract_features(images[:2]), labels[:2])
    with pytest.raises(ModelConfigError, match="hog-svm classifies photos: pass images="):
        model.predict_proba(texts=["a chair"])


def test_temperature_recovers_the_scale_of_noisy_scores() -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(scale=3.0, size=(4000, 4))
    # Labels drawn from softmax(scores / 2): the fitted temperature must come out near 2.
    proba = np.exp(scores / 2) / np.exp(scores / 2).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in proba])
    assert fit_temperature(scores, labels) == pytest.approx(2.0, rel=0.1)


def test_two_classes_round_trip(tmp_path: Path) -> None:
    images, labels = _dataset(20, seed=6)
    keep = [i for i, label in enumerate(labels) if label < 2]
    model = create_model("hog-svm", classes=CLASSES[:2], preprocessing={"image_size": 32}, pixels_per_cell=[8])
    assert isinstance(model, HogSvmClassifier)
    fit(model, model.extract_features([images[i] for i in keep]), [labels[i] for i in keep])
    proba = model.predict_proba(images=images[:4])
    assert proba.shape == (4, 2)
    model.save_pretrained(tmp_path / "binary")
    reloaded = load_model(str(tmp_path / "binary"))
    np.testing.assert_array_equal(reloaded.predict_proba(images=images[:4]), proba)


def test_fresh_process_loads_identical_predictions(trained: HogSvmClassifier, tmp_path: Path) -> None:
    folder = tmp_path / "hog-svm"
    trained.save_pretrained(folder)
    images, _ = _dataset(9, seed=7)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    expected = trained.predict_proba(images=[Image.open(p) for p in paths])
    code = (
        "import sys, numpy as np; from PIL import Image; from marketplace_reco.models import load_model; "
        "model = load_model(sys.argv[1]); "
        "np.save(sys.argv[2], model.predict_proba(images=[Image.open(p) for p in sys.argv[3:]]))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "p.npy"), *map(str, paths)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)


def test_mismatched_hog_parameters_fail_clearly(trained: HogSvmClassifier, tmp_path: Path) -> None:
    folder = tmp_path / "hog-svm"
    trained.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "orientations": 6}))
    with pytest.raises(CheckpointError, match=r"config\.json: cannot build a 'hog-svm' model from it "
                                              r"\(n_features is \d+, but these feature parameters give \d+\)"):
        load_model(str(folder))
    del config["n_features"]
    (folder / "config.json").write_text(json.dumps({**config, "orientations": 6}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'scale\.mean' has shape"):
        load_model(str(folder))


# ---- the training script on the embedded sample ----------------------------------------------
def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / "train_hog_svm.py"), *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_training_script_on_the_sample(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'sample.db'}"
    make_sample_marketplace(db_url, tmp_path / "images", n_products=65, progress=False)
    output = tmp_path / "checkpoints" / "hog-svm"
    result = _script("--db-url", db_url, "--images", str(tmp_path / "images"), "--output", str(output),
                     "--val-fraction", "0.2", "--test-fraction", "0.2", "--image-size", "64", "--C", "0.01", "0.1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "config.json", "confusion_matrix.png",
                                                        "model.safetensors"]
    config = json.loads((output / "config.json").read_text())
    metrics = config["metrics"]
    assert metrics["unit"] == "products" and metrics["n_samples"] == 13  # one test product per class
    assert set(metrics["validation_macro_f1_by_C"]) == {"0.01", "0.1"}
    assert config["C"] == float(max(metrics["validation_macro_f1_by_C"].items(), key=lambda item: item[1])[0])
    assert metrics["per_image"]["n_samples"] >= 13 and metrics["timing_s"]["feature_extraction"] > 0
    assert len(metrics["per_class"]) == 13 and np.sum(metrics["confusion_matrix"]) == 13
    assert config["data_summary"]["sizes"]["train"] == 39
    assert f"{metrics['accuracy']:.4f}" in result.stdout
    card = (output / "README.md").read_text()
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card and "13 products" in card
    model = load_model(str(output))
    assert model.classes == config["classes"] and model.source["folder"] == str(output)


def test_training_script_reports_bad_data_in_one_line(tmp_path: Path) -> None:
    result = _script("--db-url", f"sqlite:///{tmp_path / 'missing' / 'x.db'}", "--images", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "x.db" in result.stderr

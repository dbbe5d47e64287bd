"""FusionClassifier: the late head fitted on validation products, the concat head (frozen and unfrozen branches,
cache), listings with several photos or a missing input, and a self-contained checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.models import ModelConfigError, load_model
from marketplace_reco.models.fusion import FusionClassifier
from marketplace_reco.models.image_classifier import ImageClassifier
from marketplace_reco.models.text_cnn import TextCNN
from marketplace_reco.training import FeatureCache, evaluate_model
from marketplace_reco.training.fusion import FusionTrainConfig, _FromParts, _fusion_batches, train
from marketplace_reco.training.image_data import SplitImages
from marketplace_reco.training.word2vec import train_vectors

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits(sample_marketplace: Marketplace) -> dict[str, Marketplace]:
    return sample_marketplace.split((0.6, 0.2, 0.2), seed=0)


@pytest.fixture(scope="module")
def branch_folders(splits: dict[str, Marketplace], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained but saved and reloaded branches: loading gives them a source (name and revision) to record."""
    folder = tmp_path_factory.mktemp("branches")
    torch.manual_seed(0)
    classes = splits["train"].classes
    image = ImageClassifier(classes, backbone="test_resnet", preprocessing={"image_size": 32}, feature_dim=16)
    embedding = train_vectors(splits["train"].products["text"].tolist(), dim=16, epochs=2, min_count=1, workers=1,
                              progress=False)
    text = TextCNN.from_word2vec(embedding, classes, kernel_sizes=[1, 2], num_filters=8, feature_dim=12, max_length=32,
                                 ensemble_size=2)
    image.save_pretrained(folder / "image-branch")
    text.save_pretrained(folder / "text-branch")
    return {"image": folder / "image-branch", "text": folder / "text-branch"}


def _branches(branch_folders: dict[str, Path]) -> tuple[ImageClassifier, TextCNN]:
    image, text = load_model(str(branch_folders["image"])), load_model(str(branch_folders["text"]))
    return image, text  # type: ignore[return-value]


def _fusion(branch_folders: dict[str, Path], **kwargs: object) -> FusionClassifier:
    torch.manual_seed(0)
    return FusionClassifier.from_branches(*_branches(branch_folders), **kwargs)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {key for key, value in module.state_dict().items() if not torch.equal(before[key], value)}


def test_frozen_branches_stay_unchanged_and_are_cached(splits: dict[str, Marketplace], branch_folders: dict[str, Path],
                                                       tmp_path: Path) -> None:
    model = _fusion(branch_folders, head="concat")
    image_before, text_before = _snapshot(model.image_branch), _snapshot(model.text_branch)
    head_before = _snapshot(model.head)
    with FeatureCache(spill_dir=tmp_path) as cache:
        result = train(model, splits, FusionTrainConfig(epochs=2, patience=2), cache=cache)
        n_photos = len(SplitImages.from_split(splits["train"], "train").image_ids)
        n_products = len(splits["train"].products)
        # One image-feature vector per photo and one text-feature vector per product, for both splits.
        assert len(cache) > n_photos + n_products
    assert len(result.history) == 2
    assert not _changed(image_before, model.image_branch)
    assert not _changed(text_before, model.text_branch)
    assert _changed(head_before, model.head) == {"1.weight", "1.bias"}
    metrics = evaluate_model(model, splits["test"])
    assert metrics["unit"] == "products" and metrics["n_samples"] == len(splits["test"].products)


def test_unfrozen_branches_are_fine_tuned(splits: dict[str, Marketplace], branch_folders: dict[str, Path],
                                          tmp_path: Path) -> None:
    model = _fusion(branch_folders, head="concat", unfrozen=["image", "text"])
    image_before, text_before = _snapshot(model.image_branch), _snapshot(model.text_branch)
    with FeatureCache(spill_dir=tmp_path) as cache:
        train(model, splits, FusionTrainConfig(epochs=1, patience=1), cache=cache)
    image_changed = _changed(image_before, model.image_branch)
    trainable = model.image_branch.trainable_module_names
    assert {"feature.0.weight", *(f"backbone.{trainable[0]}.weight",)} <= image_changed
    # Only what the image model trained moves; its frozen trunk stays as it was (and is cached).
    assert all(key.startswith("feature.") or any(key.startswith(f"backbone.{layer}.") for layer in trainable)
               for key in image_changed)
    text_changed = _changed(text_before, model.text_branch)
    assert {f"members.{k}.{name}.weight" for k in (0, 1) for name in ("convs.0", "feature")} <= text_changed
    assert not [key for key in text_changed if key.endswith("embedding.weight")]  # word2vec vectors stayed frozen


def test_cached_inputs_give_the_same_logits_as_raw_inputs(splits: dict[str, Marketplace],
                                                          branch_folders: dict[str, Path], tmp_path: Path) -> None:
    val = splits["val"]
    photos = SplitImages.from_split(val, "validation")
    for unfrozen in ([], ["image", "text"]):
        model = _fusion(branch_folders, head="concat", unfrozen=unfrozen).eval()
        with FeatureCache(spill_dir=tmp_path) as cache:
            batches, n_image_inputs = _fusion_batches(model, val, photos, cache, "validation")
            indices = list(range(min(6, len(batches))))
            inputs, labels = batches[indices]
            with torch.no_grad():
                cached = _FromParts(model, n_image_inputs).eval()(*inputs)
        texts = val.products.set_index("product_id").loc[photos.image_products[indices], "text"].tolist()
        images = val.load_images([photos.image_ids[i] for i in indices])
        expected = model.predict_proba(images=images, texts=texts)
        np.testing.assert_allclose(torch.softmax(cached, dim=1).numpy(), expected, rtol=1e-2, atol=1e-3)
        assert labels.tolist() == photos.image_labels[indices].tolist()


def test_checkpoint_is_self_contained_and_records_its_branches(splits: dict[str, Marketplace],
                                                               branch_folders: dict[str, Path], tmp_path: Path) -> None:
    model = _fusion(branch_folders, head="concat", unfrozen=["text"])
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    folder = tmp_path / "fusion"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    image_branch, text_branch = _branches(branch_folders)
    assert config["image_model"] == {"name": str(branch_folders["image"]), "revision": image_branch.source["revision"]}
    assert config["text_model"] == {"name": str(branch_folders["text"]), "revision": text_branch.source["revision"]}
    assert config["unfrozen"] == ["text"] and config["image_config"]["backbone"] == "test_resnet"

    test = splits["test"]
    photos = SplitImages.from_split(test, "test")
    ids = photos.image_ids[:5]
    texts = test.products.set_index("product_id").loc[photos.image_products[:5], "text"].tolist()
    for i, image in enumerate(test.load_images(ids)):
        image.save(tmp_path / f"p{i}.png")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    expected = model.predict_proba(images=test.load_images(ids), texts=texts)

    # The branch checkpoints are gone: the fusion checkpoint must not need them.
    moved = tmp_path / "elsewhere"
    shutil.copytree(branch_folders["image"].parent, moved)
    shutil.rmtree(branch_folders["image"].parent)
    try:
        script = (
            "import sys, json, numpy as np; from PIL import Image; from marketplace_reco.models import load_model\n"
            "m = load_model(sys.argv[1]); texts = json.load(open(sys.argv[3]))\n"
            "np.save(sys.argv[2], m.predict_proba(images=[Image.open(p) for p in sys.argv[4:]], texts=texts))\n"
        )
        out = tmp_path / "proba.npy"
        subprocess.run([sys.executable, "-c", script, str(folder), str(out), str(tmp_path / "texts.json"),
                        *(str(tmp_path / f"p{i}.png") for i in range(5))],
                       check=True, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        shutil.copytree(moved, branch_folders["image"].parent)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-6)


def test_the_late_head_is_fitted_on_validation_products(splits: dict[str, Marketplace],
                                                         branch_folders: dict[str, Path]) -> None:
    model = _fusion(branch_folders)
    branches_before = _snapshot(model.image_branch) | {f"t.{k}": v for k, v in _snapshot(model.text_branch).items()}
    result = train(model, splits, FusionTrainConfig(late_l2=[0.01, 1.0]))
    late = result.metrics["late_head"]
    val_with_photos = len(SplitImages.from_split(splits["val"], "val").product_ids)
    assert late["validation_products"] == val_with_photos and late["l2"] in (0.01, 1.0)
    assert set(late["cross_validated_nll_by_l2"]) == {"0.01", "1.0"}
    assert late["validation_nll"]["fitted"] <= late["validation_nll"]["plain_log_linear"] + 1e-9
    assert not torch.equal(model.bias, torch.zeros_like(model.bias))  # fitted, not the initial log-linear sum
    assert not _changed(branches_before, model.image_branch)  # branches stay as trained
    assert result.history == []
    metrics = evaluate_model(model, splits["test"])
    assert metrics["n_samples"] == len(splits["test"].products) and metrics["with_photos"]["n_samples"] > 0


def test_the_late_head_fits_when_a_class_has_one_validation_product(splits: dict[str, Marketplace],
                                                                     branch_folders: dict[str, Path]) -> None:
    val = splits["val"]
    with_photos = val.products[val.products["image_ids"].map(len) > 0]
    rare = with_photos["label"].value_counts().index[0]
    kept = with_photos[with_photos["label"] != rare]["product_id"].tolist()
    kept.append(with_photos[with_photos["label"] == rare]["product_id"].iloc[0])
    model = _fusion(branch_folders)
    late = train(model, {**splits, "val": val.subset(kept)}, FusionTrainConfig(late_l2=[0.01, 1.0])
                 ).metrics["late_head"]
    # No fold can hold out the rare class's only product: no cross-validation, the strongest L2.
    assert late["l2"] == 1.0 and all(np.isnan(v) for v in late["cross_validated_nll_by_l2"].values())
    assert np.isfinite(model.predict_proba(texts=["a sofa"])).all()


@pytest.mark.parametrize("head", ["late", "concat"])
def test_several_photos_one_photo_or_no_text_each_get_an_answer(splits: dict[str, Marketplace],
                                                                 branch_folders: dict[str, Path], head: str) -> None:
    model = _fusion(branch_folders, head=head).eval()
    product = splits["test"].products.iloc[0]
    photos = splits["test"].load_images(product["image_ids"])
    extra = splits["test"].load_images(splits["test"].products.iloc[1]["image_ids"][:1])
    several = [*photos, *extra]
    proba = model.predict_proba(images=[several, several[0], None, several], texts=[product["text"], "", "sofa", None])
    assert proba.shape == (4, len(model.classes)) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    if head == "late":
        # One input: that branch's own calibrated answer; several photos: their probabilities averaged.
        image, text = _branches(branch_folders)
        np.testing.assert_allclose(proba[1], image.predict_proba(images=[several[0]])[0], atol=1e-6)
        np.testing.assert_allclose(proba[2], text.predict_proba(texts=["sofa"])[0], atol=1e-6)
        np.testing.assert_allclose(proba[3], image.predict_proba(images=several).mean(axis=0), atol=1e-6)
    with pytest.raises(ModelConfigError, match="listing 0 has neither a photo nor a text"):
        model.predict_proba(images=[None], texts=["  "])


def test_bad_inputs_are_clear_errors(branch_folders: dict[str, Path]) -> None:
    model = _fusion(branch_folders)
    with pytest.raises(ModelConfigError, match="one entry of images per text"):
        model.predict_proba(images=[], texts=["a bike"])
    with pytest.raises(ModelConfigError, match="needs images=.* and/or texts="):
        model.predict_proba()
    with pytest.raises(ModelConfigError, match="unknown branch"):
        _fusion(branch_folders, head="concat", unfrozen=["audio"])
    with pytest.raises(ModelConfigError, match="unfrozen branches train with the concat head"):
        _fusion(branch_folders, unfrozen=["text"])
    with pytest.raises(ModelConfigError, match="head must be one of"):
        _fusion(branch_folders, head="gated")
    image, text = _branches(branch_folders)
    other = dict(model.config["image_config"], classes=["x", "y"])
    with pytest.raises(ModelConfigError, match="the image branch's classes"):
        FusionClassifier(image.classes, other, model.config["text_config"])

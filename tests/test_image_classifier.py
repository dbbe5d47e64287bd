"""ImageClassifier: the frozen/trainable split, preprocessing from the config, checkpoints, pretrained weights,
training with and without the feature cache, and the training script's error for unreachable weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.models import ModelConfigError, load_model
from marketplace_reco.models.image_classifier import ImageClassifier, PretrainedWeightsError
from marketplace_reco.training import FeatureCache, evaluate_model
from marketplace_reco.training.image_classifier import ImageTrainConfig, train
from marketplace_reco.training.image_data import SplitImages, augment_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["bikes", "chairs", "phones"]


def _photos(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (30, 40), (48, 48)]  # letterboxing must handle any aspect
    return [Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 3][::-1], 3), dtype=np.uint8)) for i in range(n)]


def _tiny(classes: list[str] = CLASSES, **kwargs: object) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(classes, backbone="test_resnet", preprocessing={"image_size": 32}, **kwargs)


def test_default_split_trains_only_the_last_conv_and_norm_of_resnet50() -> None:
    model = ImageClassifier(CLASSES, backbone="resnet50", preprocessing={"image_size": 64})
    assert model.trainable_layer_names == ["layer4.2.conv3", "layer4.2.bn3"]
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["backbone.layer4.2.bn3.bias", "backbone.layer4.2.bn3.weight", "backbone.layer4.2.conv3.weight",
                         "feature.0.bias", "feature.0.weight", "head.1.bias", "head.1.weight"]
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        trunk = model.frozen_trunk(x)
        # The cache holds the last block's input (for the residual) and its conv2 activation.
        assert [tuple(t.shape[1:]) for t in trunk] == [(2048, 2, 2), (512, 2, 2)]
        torch.testing.assert_close(model.trainable_tail(*trunk), model.backbone(x), rtol=0, atol=0)


def test_train_mode_leaves_frozen_layers_at_inference_behaviour() -> None:
    model = _tiny(trainable_layers=2).train()
    frozen_bn = model.backbone.bn1
    before = frozen_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert not frozen_bn.training
    torch.testing.assert_close(frozen_bn.running_mean, before)
    assert model.backbone.get_submodule(model.trainable_layer_names[-1]).training


@pytest.mark.parametrize("layers", [0, 5, "all"])
def test_trainable_layers_counts_trailing_parameterised_layers(layers: int | str) -> None:
    model = _tiny(trainable_layers=layers)
    n_backbone_layers = len([m for m in model.backbone.modules()
                             if next(m.parameters(recurse=False), None) is not None])
    expected = n_backbone_layers if layers == "all" else layers
    assert len(model.trainable_layer_names) == expected
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.trainable_tail(*model.frozen_trunk(x)), model.backbone(x))


@pytest.mark.parametrize("bad", [-1, 10_000, "last", 2.5])
def test_bad_trainable_layers_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ModelConfigError, match="trainable_layers must be 'all' or an integer from 0 to"):
        _tiny(trainable_layers=bad)


def test_unknown_backbone_and_preprocessing_keys_are_clear_errors() -> None:
    with pytest.raises(ModelConfigError, match="unknown timm backbone 'resnet_fifty'"):
        ImageClassifier(CLASSES, backbone="resnet_fifty")
    with pytest.raises(ModelConfigError, match=r"unknown keys \['size'\]"):
        ImageClassifier(CLASSES, backbone="test_resnet", preprocessing={"size": 32})


def test_preprocessing_is_resolved_from_timm_and_recorded() -> None:
    model = _tiny()
    assert model.config["preprocessing"] == {"image_size": 32, "letterbox_fill": [0, 0, 0],
                                             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # test_resnet's config
    default = ImageClassifier(CLASSES, backbone="resnet50")
    assert default.config["preprocessing"]["image_size"] == 224
    assert default.config["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_predict_proba_preprocesses_like_training() -> None:
    model = _tiny().eval()
    photos = _photos(5)
    pixels = model.to_pixels(photos)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(model(model.normalize(pixels)), dim=1).numpy()
    proba = model.predict_proba(images=photos)
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert model.extract_features(photos).shape == (5, 256)
    with pytest.raises(ModelConfigError, match="needs at least one image"):
        model.predict_proba(images=[])


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    model = _tiny(feature_dim=16)
    with torch.no_grad():  # make the head non-trivial so a wrong load would show
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    photos = _photos(4, seed=1)
    for i, photo in enumerate(photos):
        photo.save(tmp_path / f"p{i}.png")
    expected = model.predict_proba(images=photos)

    script = (
        "import sys, numpy as np; from PIL import Image; from marketplace_reco.models import load_model\n"
        "m = load_model(sys.argv[1])\n"
        "np.save(sys.argv[2], m.predict_proba(images=[Image.open(p) for p in sys.argv[3:]]))\n"
    )
    out = tmp_path / "proba.npy"
    photo_paths = [str(tmp_path / f"p{i}.png") for i in range(4)]
    subprocess.run([sys.executable, "-c", script, str(folder), str(out), *photo_paths],
                   check=True, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6, atol=1e-7)
    loaded = load_model(str(folder))
    assert isinstance(loaded, ImageClassifier) and loaded.classes == CLASSES and not loaded.training


def _offline_env(tmp_path: Path) -> dict[str, str]:
    # No network and an empty Hugging Face cache: pretrained weights cannot be found anywhere.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


def test_loading_a_checkpoint_of_a_pretrained_model_never_downloads(tmp_path: Path) -> None:
    model = _tiny()
    model._record_config(pretrained=True)  # as recorded by a model created with timm's pretrained weights
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from marketplace_reco.models import load_model; "
                               "print(load_model(sys.argv[1]).config['pretrained'])", str(folder)],
        cwd=REPO_ROOT, env=_offline_env(tmp_path), capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_unavailable_pretrained_weights_name_the_way_out(tmp_path: Path) -> None:
    script = ("from marketplace_reco.models.image_classifier import ImageClassifier\n"
              "ImageClassifier(['a', 'b'], backbone='test_resnet', pretrained=True)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=_offline_env(tmp_path),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "PretrainedWeightsError: cannot fetch pretrained weights for backbone 'test_resnet'" in result.stderr
    assert "--no-pretrained" in result.stderr and "--weights FILE" in result.stderr


def test_local_weights_file_is_loaded_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_resnet")  # with its classifier, as timm or torchvision save it
    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = _tiny(pretrained=str(weights))
    torch.testing.assert_close(model.backbone.conv1[0].weight, source.conv1[0].weight)
    assert model.config["pretrained"] == str(weights)

    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "layer1.0.conv1.weight"}
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    expected = (r"does not fit backbone 'test_resnet': missing keys \['layer1.0.conv1.weight'\], "
                r"unexpected keys \['extra.weight'\]")
    with pytest.raises(PretrainedWeightsError, match=expected):
        _tiny(pretrained=str(tmp_path / "wrong.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        _tiny(pretrained=str(tmp_path / "missing.safetensors"))


def test_cached_and_uncached_training_learn_the_same(sample_marketplace: Marketplace, tmp_path: Path) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    histories = []
    for use_cache in (True, False):
        model = _tiny(splits["train"].classes)
        with FeatureCache(spill_dir=tmp_path) as cache:
            result = train(model, splits, ImageTrainConfig(epochs=2, patience=2, batch_size=16, cache=use_cache),
                           cache=cache)
            assert len(cache) == (len(SplitImages.from_split(splits["train"], "t").image_ids)
                                  + len(SplitImages.from_split(splits["val"], "v").image_ids) if use_cache else 0)
        histories.append(result.history)
    for cached, uncached in zip(*histories):
        assert cached["train_loss"] == pytest.approx(uncached["train_loss"], rel=1e-3)
        assert cached["val_loss"] == pytest.approx(uncached["val_loss"], rel=1e-3)


def test_augmented_training_and_per_product_evaluation(sample_marketplace: Marketplace) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    model = _tiny(splits["train"].classes, trainable_layers="all")
    before = model.backbone.conv1[0].weight.detach().clone()
    result = train(model, splits, ImageTrainConfig(epochs=1, patience=1, augment=True, batch_size=16))
    assert len(result.history) == 1 and not model.training
    assert not torch.equal(before, model.backbone.conv1[0].weight)  # the whole network trained
    metrics = evaluate_model(model, splits["test"])
    photos = SplitImages.from_split(splits["test"], "test")
    assert metrics["unit"] == "products" and metrics["n_samples"] == len(photos.product_ids)
    assert metrics["per_image"]["n_samples"] == len(photos.image_ids) > len(photos.product_ids)


def test_augment_batch_keeps_shape_and_range_and_varies() -> None:
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(4, 3, 24, 24), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    first, second = augment_batch(pixels, generator), augment_batch(pixels, generator)
    assert first.shape == (4, 3, 24, 24) and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert not torch.allclose(first, second)


def test_train_script_without_reachable_weights_says_how_to_go_on(sample_data: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/train_image.py", "--db-url", sample_data["db_url"], "--images",
         sample_data["image_location"], "--backbone", "test_resnet", "--output", str(tmp_path / "never")],
        cwd=REPO_ROOT, env=_offline_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 1
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith("error: cannot fetch pretrained weights for backbone 'test_resnet'")
    assert "--no-pretrained" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()

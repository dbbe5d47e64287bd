"""ImageClassifier: block-wise unfreezing and the frozen/trainable split, preprocessing from the config, flip
averaging and temperature, checkpoints (old ones too), pretrained weights by hub name and from a file, training
with and without the feature cache, cached augmented views, calibration, the similar-listing descriptor and its
learned whitening, and the training script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.models import ModelConfigError, load_model
from marketplace_reco.models.image_classifier import ImageClassifier, PretrainedWeightsError, backbone_blocks
from marketplace_reco.training import FeatureCache, evaluate_model
from marketplace_reco.training.image_classifier import (
    RETRIEVAL_REGULARIZATIONS,
    ImageTrainConfig,
    cache_trunk_outputs,
    fit_retrieval,
    learned_whitening,
    train,
    trunk_fingerprint,
)
from marketplace_reco.training.image_data import (
    RandomViewBatches,
    SplitImages,
    augment_batch,
    augmented_view_names,
    render_view,
    view_key,
)
from marketplace_reco.training.metrics import same_listing_ranks, same_listing_recall

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["bikes", "chairs", "phones"]
#: The revision a test's Hugging Face cache pretends to hold.
HUB_REVISION = "0" * 40


def _photos(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (30, 40), (48, 48)]  # letterboxing must handle any aspect
    return [Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 3][::-1], 3), dtype=np.uint8)) for i in range(n)]


def _tiny(classes: list[str] = CLASSES, backbone: str = "test_resnet", **kwargs: object) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(classes, backbone=backbone, preprocessing={"image_size": 32}, **kwargs)


def test_default_split_trains_the_last_block_of_resnet50() -> None:
    model = ImageClassifier(CLASSES, backbone="resnet50", preprocessing={"image_size": 64})
    assert model.trainable_module_names == ["layer4.2.conv1", "layer4.2.bn1", "layer4.2.conv2", "layer4.2.bn2",
                                            "layer4.2.conv3", "layer4.2.bn3"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name.rpartition(".")[0] for name in trainable} == {
        *(f"backbone.layer4.2.{layer}" for layer in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")),
        "feature.0", "head.1"}
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        trunk = model.frozen_trunk(x)
        # The cache holds the last block's input (its residual is that input itself).
        assert [tuple(t.shape[1:]) for t in trunk] == [(2048, 2, 2)]
        torch.testing.assert_close(model.trainable_tail(*trunk), model.backbone(x), rtol=0, atol=0)


def test_train_mode_leaves_frozen_layers_at_inference_behaviour() -> None:
    model = _tiny(trainable_blocks=1).train()
    frozen_bn = model.backbone.bn1
    before = frozen_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert not frozen_bn.training
    torch.testing.assert_close(frozen_bn.running_mean, before)
    assert model.backbone.get_submodule(model.trainable_module_names[-1]).training


def test_blocks_are_timms_own_grouping() -> None:
    resnet = timm.create_model("resnet50", num_classes=0)
    blocks = backbone_blocks(resnet)
    assert len(blocks) == 1 + 3 + 4 + 6 + 3  # the stem, then every bottleneck
    assert blocks[0] == ["conv1", "bn1"] and blocks[1][0] == "layer1.0.conv1" and blocks[-1][0] == "layer4.2.conv1"
    lite = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    blocks = backbone_blocks(lite)
    assert blocks[0] == ["conv_stem", "bn1"] and blocks[1][0] == "blocks.0.0.conv_dw"
    assert blocks[-1][0] == "blocks.6.0.conv_pw" and blocks[-1][-2:] == ["conv_head", "bn2"]


# The blocks of timm's test networks: test_resnet's stem, layer1.0 ... layer4.0; test_efficientnet's stem,
# blocks.0.0 ... blocks.4.0, whose last block carries conv_head + bn2.
_LAST_BLOCKS = {
    "test_resnet": [("layer4.0.",), ("layer3.0.",)],
    "test_efficientnet": [("blocks.4.0.", "conv_head.", "bn2."), ("blocks.3.0.",)],
}


def _trainable_prefixes(backbone: str, blocks: int | str) -> tuple[str, ...] | None:
    """The parameter name prefixes of the last ``blocks`` blocks; None for all of them."""
    if blocks == "all":
        return None
    return tuple(prefix for block in _LAST_BLOCKS[backbone][:blocks] for prefix in block)  # type: ignore[misc]


@pytest.mark.parametrize("backbone", sorted(_LAST_BLOCKS))
@pytest.mark.parametrize("blocks", [0, 1, 2, "all"])
def test_trainable_blocks_counts_whole_trailing_blocks(backbone: str, blocks: int | str) -> None:
    model = _tiny(backbone=backbone, trainable_blocks=blocks)
    prefixes = _trainable_prefixes(backbone, blocks)
    names = [name for name, _ in model.backbone.named_parameters()]
    expected = set(names) if prefixes is None else {name for name in names if name.startswith(prefixes)}
    assert {name for name, p in model.backbone.named_parameters() if p.requires_grad} == expected
    assert all(p.requires_grad for p in (*model.feature.parameters(), *model.head.parameters()))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.trainable_tail(*model.frozen_trunk(x)), model.backbone(x))


@pytest.mark.parametrize("backbone", sorted(_LAST_BLOCKS))
def test_training_moves_the_trainable_blocks_and_nothing_frozen(sample_marketplace: Marketplace,
                                                                backbone: str) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    model = _tiny(splits["train"].classes, backbone=backbone, trainable_blocks=2)
    before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    train(model, splits, ImageTrainConfig(epochs=1, patience=1, batch_size=16, backbone_learning_rate=1e-2))
    changed = {key for key, value in model.backbone.state_dict().items() if not torch.equal(before[key], value)}
    prefixes = _trainable_prefixes(backbone, 2)
    assert changed and all(key.startswith(prefixes) for key in changed)  # norms' running statistics included
    trained = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained & changed == trained  # every trainable parameter moved


@pytest.mark.parametrize("bad", [-1, 10_000, "last", 2.5, True])
def test_bad_trainable_blocks_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ModelConfigError, match=r"trainable_blocks must be 'all' or an integer from 0 to 5 "
                                                r"\(the blocks of 'test_resnet', stem included\)"):
        _tiny(trainable_blocks=bad)


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


def test_temperature_divides_the_logits() -> None:
    model = _tiny().eval()
    photos = _photos(4)
    with torch.no_grad():
        logits = model(model.preprocess(photos))
    model.calibrate(2.5)
    assert model.config["temperature"] == 2.5
    np.testing.assert_allclose(model.predict_proba(images=photos), torch.softmax(logits / 2.5, dim=1).numpy(),
                               rtol=1e-5, atol=1e-6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ModelConfigError, match="temperature must be a positive number"):
            model.calibrate(bad)
    with pytest.raises(ModelConfigError, match="temperature must be a positive number"):
        _tiny(temperature=0.0)


def test_flip_averaging_predicts_from_the_mean_logits_of_a_photo_and_its_mirror() -> None:
    model = _tiny(flip_averaging=True, temperature=1.5).eval()
    photos = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))
              for i in range(3)]
    x = model.preprocess(photos)
    with torch.no_grad():
        expected = torch.softmax((model(x) + model(x.flip(-1))) / 2 / 1.5, dim=1).numpy()
    proba = model.predict_proba(images=photos)
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-6)
    # Hence a photo and its mirror image get the same answer, which a plain model does not give.
    mirrored = [ImageOps.mirror(photo) for photo in photos]
    np.testing.assert_allclose(model.predict_proba(images=mirrored), proba, rtol=1e-5, atol=1e-6)
    plain = _tiny(temperature=1.5).eval()
    assert not np.allclose(plain.predict_proba(images=mirrored), plain.predict_proba(images=photos), atol=1e-4)
    assert model.config["flip_averaging"] is True


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    model = _tiny(feature_dim=16, flip_averaging=True)
    model.calibrate(1.7)
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
    assert loaded.temperature == 1.7 and loaded.prediction_views == ["plain", "mirror"]


def _save_as_before_blocks(model: ImageClassifier, folder: Path, trainable_layers: int | str) -> None:
    """Save ``model`` with the config an earlier version wrote: ``trainable_layers``, no temperature, no flip."""
    config = model.init_arguments()
    for key in ("trainable_blocks", "temperature", "flip_averaging"):
        del config[key]
    model._hub_mixin_config = {**config, "trainable_layers": trainable_layers}
    model.save_pretrained(folder)


@pytest.mark.parametrize(("layers", "blocks"), [(2, 1), (6, 1), (7, 2), (0, 0), ("all", "all")])
def test_a_checkpoint_counting_trainable_layers_loads_as_the_whole_blocks_holding_them(
        tmp_path: Path, layers: int | str, blocks: int | str) -> None:
    # test_resnet's layer4.0 holds 6 parameterised layers (conv1, bn1, conv2, bn2, downsample.1, downsample.2).
    model = _tiny(feature_dim=16).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    _save_as_before_blocks(model, tmp_path / "old", layers)
    assert "trainable_layers" in (tmp_path / "old" / "config.json").read_text()
    loaded = load_model(str(tmp_path / "old"))
    assert isinstance(loaded, ImageClassifier)
    assert loaded.config["trainable_blocks"] == blocks and "trainable_layers" not in loaded.config
    assert loaded.temperature == 1.0 and loaded.prediction_views == ["plain"]
    photos = _photos(3)
    np.testing.assert_allclose(loaded.predict_proba(images=photos), model.predict_proba(images=photos), rtol=1e-5,
                               atol=1e-6)
    loaded.save_pretrained(tmp_path / "resaved")  # saved again, it is a checkpoint of this version
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["trainable_blocks"] == blocks


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


def _hub_cache(cache: Path, name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Lay out ``timm/<name>`` in a Hugging Face cache as a download would (``model.safetensors`` of a timm
    model with its classifier); returns the weights written."""
    torch.manual_seed(seed)
    source = timm.create_model(name.partition(".")[0])
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    repo = cache / f"models--timm--{name}"
    (repo / "snapshots" / HUB_REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    save_file(state, str(repo / "snapshots" / HUB_REVISION / "model.safetensors"))
    return state


def _hub_env(cache: Path) -> dict[str, str]:
    # For the subprocess only: the test session itself keeps its own Hugging Face settings.
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("name", ["test_resnet.r160_in1k", "test_efficientnet.r160_in1k"])
def test_pretrained_weights_by_hub_name_go_through_timm(tmp_path: Path, name: str) -> None:
    written = _hub_cache(tmp_path / "hub", name)
    script = ("import sys; from safetensors.torch import save_file\n"
              "from marketplace_reco.models.image_classifier import ImageClassifier\n"
              "model = ImageClassifier(['a', 'b'], backbone=sys.argv[1], pretrained=True)\n"
              "print(model.preprocessing['image_size'])\n"
              "save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, sys.argv[2])\n")
    result = subprocess.run([sys.executable, "-c", script, name, str(tmp_path / "trunk.safetensors")],
                            cwd=REPO_ROOT, env=_hub_env(tmp_path / "hub"), capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["160"]  # the pretrained tag's input size
    loaded = load_file(str(tmp_path / "trunk.safetensors"))
    classifier = timm.create_model(name).pretrained_cfg["classifier"]
    expected = {key: value for key, value in written.items() if not key.startswith(classifier + ".")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_unknown_pretrained_tag_is_a_clear_error() -> None:
    with pytest.raises(ModelConfigError, match=r"'test_resnet' has no such pretrained tag; its tags: "
                                                r"\['test_resnet.r160_in1k'\]"):
        ImageClassifier(CLASSES, backbone="test_resnet.in22k")


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
    model = _tiny(splits["train"].classes, trainable_blocks="all")
    before = model.backbone.conv1[0].weight.detach().clone()
    result = train(model, splits, ImageTrainConfig(epochs=1, patience=1, augment=True, batch_size=16))
    assert len(result.history) == 1 and not model.training
    assert not torch.equal(before, model.backbone.conv1[0].weight)  # the whole network trained
    metrics = evaluate_model(model, splits["test"])
    photos = SplitImages.from_split(splits["test"], "test")
    assert metrics["unit"] == "products" and metrics["n_samples"] == len(photos.product_ids)
    assert metrics["per_image"]["n_samples"] == len(photos.image_ids) > len(photos.product_ids)


def test_augmented_views_are_cached_once_and_drawn_at_random_every_epoch(sample_marketplace: Marketplace,
                                                                         tmp_path: Path) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    model = _tiny(splits["train"].classes, backbone="test_efficientnet", trainable_blocks=1, flip_averaging=True)
    trunk_rows: list[int] = []
    frozen_trunk = model.frozen_trunk

    def counted(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trunk_rows.append(len(x))
        return frozen_trunk(x)

    model.frozen_trunk = counted  # type: ignore[method-assign]
    n_train = len(SplitImages.from_split(splits["train"], "train").image_ids)
    n_val = len(SplitImages.from_split(splits["val"], "validation").image_ids)
    with FeatureCache(spill_dir=tmp_path) as cache:
        result = train(model, splits, ImageTrainConfig(epochs=3, patience=3, batch_size=16, augmented_views=2),
                       cache=cache)
        # The plain photo and 2 augmented views per training photo, the photo and its mirror per validation photo:
        # each through the trunk once, however many epochs followed.
        assert len(result.history) == 3
        assert sum(trunk_rows) == len(cache) == 3 * n_train + 2 * n_val

        photo = SplitImages.from_split(splits["train"], "train").image_ids[0]
        fingerprint = trunk_fingerprint(model)
        views = ["plain", *augmented_view_names(2, seed=0)]
        arrays = [cache.get(fingerprint, [view_key(photo, view)])[0] for view in views]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not np.allclose(arrays[i], arrays[j], atol=1e-2), (views[i], views[j])

        # Another cache with the same seed holds the same views; another seed draws others.
        with FeatureCache(spill_dir=tmp_path) as again:
            cache_trunk_outputs(model, splits["train"].image_store, [photo], again,
                                views=augmented_view_names(2, seed=0) + augmented_view_names(1, seed=1))
            for view in views[1:]:
                key = view_key(photo, view)
                np.testing.assert_array_equal(again.get(fingerprint, [key])[0], cache.get(fingerprint, [key])[0])
            other = again.get(fingerprint, [view_key(photo, augmented_view_names(1, seed=1)[0])])[0]
            assert not np.allclose(other, arrays[1], atol=1e-2)


def test_a_view_depends_on_the_photo_not_on_its_batch() -> None:
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(3, 3, 24, 24), dtype=np.uint8))
    ids = ["a", "b", "c"]
    view = augmented_view_names(1, seed=7)[0]
    together = render_view(pixels, ids, view)
    torch.testing.assert_close(render_view(pixels[[2, 0]], ["c", "a"], view), together[[2, 0]])
    assert not torch.allclose(together, pixels.float() / 255)
    torch.testing.assert_close(render_view(pixels, ids, "mirror"), pixels.flip(-1).float() / 255)
    with pytest.raises(ValueError, match="unknown view 'sideways'"):
        render_view(pixels, ids, "sideways")


def test_random_view_batches_draw_one_cached_view_per_item(tmp_path: Path) -> None:
    ids = [f"p{i}" for i in range(12)]
    views = ["plain", *augmented_view_names(2, seed=0)]
    with FeatureCache(spill_dir=tmp_path) as cache:
        for number, view in enumerate(views):  # item i in view v holds the value 10 * v + i
            cache.put("fp", [view_key(i, view) for i in ids],
                      [np.array([[10.0 * number + i] for i in range(12)], dtype=np.float32)])
        keys = [[view_key(i, view) for i in ids] for view in views]
        batches = RandomViewBatches(cache, "fp", keys, np.arange(12), seed=3)
        drawn = []
        for _ in range(4):
            (values,), labels = batches[list(range(12))]
            assert labels.tolist() == list(range(12))
            view_of_item = (values[:, 0] - torch.arange(12)) / 10
            assert set(view_of_item.tolist()) <= {0.0, 1.0, 2.0}
            drawn.append(view_of_item)
        assert set(torch.cat(drawn).tolist()) == {0.0, 1.0, 2.0}
        assert not torch.equal(drawn[0], drawn[1])  # a new draw every time
        (replayed,), _ = RandomViewBatches(cache, "fp", keys, np.arange(12), seed=3)[list(range(12))]
        torch.testing.assert_close((replayed[:, 0] - torch.arange(12)) / 10, drawn[0])  # reproducible


def test_augmented_views_need_the_cache(sample_marketplace: Marketplace) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    for options in ({"augment": True}, {"cache": False}):
        with pytest.raises(ModelConfigError, match="augmented_views are cached outputs of the frozen trunk"):
            train(_tiny(splits["train"].classes), splits, ImageTrainConfig(augmented_views=2, **options))


def test_training_calibrates_the_products_probabilities(sample_marketplace: Marketplace) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    model = _tiny(splits["train"].classes, trainable_blocks=1)
    result = train(model, splits, ImageTrainConfig(epochs=4, patience=4, batch_size=16, learning_rate=1e-2,
                                                   label_smoothing=0.0))
    calibration = result.metrics["calibration"]
    assert model.temperature == calibration["temperature"] == model.config["temperature"] != 1.0
    assert result.metrics["training_config"]["learning_rate"] == 1e-2
    photos = SplitImages.from_split(splits["val"], "validation")
    images = splits["val"].load_images(photos.image_ids)

    def product_nll() -> float:
        proba = photos.product_proba(model.predict_proba(images=images))
        return float(-np.log(proba[np.arange(len(proba)), photos.product_labels]).mean())

    calibrated = product_nll()
    model.calibrate(1.0)
    assert calibrated < product_nll()


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


def test_train_script_with_a_hub_backbone_records_its_recipe(sample_data: dict[str, str], tmp_path: Path) -> None:
    name = "test_efficientnet.r160_in1k"
    written = _hub_cache(tmp_path / "hub", name)
    folder = tmp_path / "image"
    result = subprocess.run(
        [sys.executable, "scripts/train_image.py", "--db-url", sample_data["db_url"], "--images",
         sample_data["image_location"], "--backbone", name, "--trainable-blocks", "1", "--image-size", "32",
         "--augmented-views", "1", "--flip-averaging", "--epochs", "2", "--patience", "2", "--batch-size", "16",
         "--backbone-learning-rate", "3e-4", "--label-smoothing", "0.05", "--output", str(folder)],
        cwd=REPO_ROOT, env=_hub_env(tmp_path / "hub"), capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(str(folder))
    assert isinstance(model, ImageClassifier)
    assert model.config["backbone"] == name and model.config["pretrained"] is True
    assert model.config["trainable_blocks"] == 1 and model.config["flip_averaging"] is True
    assert model.config["temperature"] == model.metrics["calibration"]["temperature"]
    recipe = model.metrics["training_config"]
    assert (recipe["augmented_views"], recipe["backbone_learning_rate"], recipe["label_smoothing"]) == (1, 3e-4, 0.05)
    assert 0.0 <= model.metrics["ece"] <= 1.0
    # The frozen part is the hub's weights, untouched by training.
    frozen = model.frozen_state_dict()
    assert frozen and all(torch.equal(value, written[key]) for key, value in frozen.items())
    card = (folder / "README.md").read_text()
    assert "| expected calibration error (15 bins) |" in card and '"augmented_views": 1' in card


# ---- the similar-listing descriptor -------------------------------------------------------------------------
def test_learned_whitening_brings_two_photos_of_a_listing_together() -> None:
    # 200 listings, two photos each: a listing's signal plus a large nuisance (lighting, angle) in a few directions
    # shared by no listing; raw cosine neighbours are ruled by the nuisance, whitened ones by the listing.
    rng = np.random.default_rng(0)
    signal = np.repeat(rng.normal(size=(200, 24)), 2, axis=0)
    nuisance = np.zeros_like(signal)
    nuisance[:, :4] = 6.0 * rng.normal(size=(400, 4))
    descriptors = signal + nuisance + 0.1 * rng.normal(size=signal.shape)
    owners = np.repeat(np.arange(200), 2)
    pairs = np.arange(400).reshape(200, 2)
    mean, projection = learned_whitening(descriptors[:200], pairs[:100], dim=16, regularization=1e-3)
    assert mean.shape == (24,) and projection.shape == (24, 16)
    held_out = descriptors[200:], owners[200:]  # listings the whitening never saw
    assert same_listing_recall(*held_out, k=1) < 0.5
    assert same_listing_recall((held_out[0] - mean) @ projection, held_out[1], k=1) > 0.95


def test_same_listing_recall_counts_a_hit_among_the_k_nearest_other_photos() -> None:
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.3, 0.7], [0.1, 0.9]])
    owners = ["a", "a", "b", "b", "c"]  # c has one photo: not a query
    # a's photos are each other's nearest; c's photo comes before the other photo of b for both of b's.
    assert same_listing_recall(vectors, owners, k=1) == pytest.approx(2 / 4)
    assert same_listing_recall(vectors, owners, k=2) == pytest.approx(1.0)
    assert same_listing_ranks(vectors, owners).tolist() == [1, 1, 2, 2]
    assert same_listing_ranks(vectors, owners, queries=[2, 0], k=1).tolist() == [0, 1]


def test_a_retrieval_descriptor_is_fitted_by_training_and_saved_with_the_model(sample_marketplace: Marketplace,
                                                                               tmp_path: Path) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    model = _tiny(splits["train"].classes, backbone="test_efficientnet", retrieval={"dim": 12})
    photos = _photos(5, seed=2)
    with pytest.raises(ModelConfigError, match="not fitted yet"):
        model.embed(images=[photos[:2]])
    widths = model.retrieval.block_widths
    # The last 4 stages' pooled outputs, the pooled output and the 8 x 8 x 8 colour histogram.
    assert len(widths) == 6 and widths[-2] == model.backbone.num_features and widths[-1] == 512
    result = train(model, splits, ImageTrainConfig(epochs=1, patience=1, batch_size=16))
    fit = result.metrics["retrieval"]
    train_photos = SplitImages.from_split(splits["train"], "train")
    multi = [p for p in set(train_photos.image_products) if (train_photos.image_products == p).sum() >= 2]
    assert fit["photos"] == sum((train_photos.image_products == p).sum() for p in multi)
    assert fit["pairs"] == fit["photos"] - len(multi) > 0
    recall = fit["validation_same_listing_recall_at_10"]
    assert set(recall) == {"pooled_output", *(f"regularization {r}" for r in RETRIEVAL_REGULARIZATIONS)}
    assert all(0.0 <= v <= 1.0 for v in recall.values())
    assert recall[f"regularization {fit['regularization']}"] == max(recall[f"regularization {r}"]
                                                                    for r in RETRIEVAL_REGULARIZATIONS)

    vectors = model.embed(images=[photos[:2], photos[2]])
    assert vectors.shape == (2, 12) == (2, model.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    photo_vectors = model.photo_vectors(photos[:3])
    expected = np.stack([photo_vectors[:2].mean(axis=0), photo_vectors[2]])
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    # A photo's colours are part of its vector: the same photo in other colours moves it.
    recoloured = Image.fromarray(np.asarray(photos[0])[..., ::-1].copy())
    assert not np.allclose(model.photo_vectors([recoloured]), photo_vectors[:1], atol=1e-3)

    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {"retrieval.block_mean", "retrieval.mean", "retrieval.projection"} <= set(weights)
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.config["retrieval"] == {"dim": 12, "stages": 4, "colour_bins": 8, "colour_weight": 1.5}
    np.testing.assert_allclose(loaded.embed(images=[photos[:2], photos[2]]), vectors, atol=1e-6)


def test_the_whitening_without_validation_pairs_keeps_the_first_ridge_and_needs_training_pairs(
        sample_marketplace: Marketplace) -> None:
    splits = sample_marketplace.split((0.6, 0.2, 0.2), seed=0)
    photos = splits["val"].products["image_ids"].map(len)
    single = {**splits, "val": splits["val"].subset(splits["val"].products["product_id"][photos == 1])}
    model = _tiny(splits["train"].classes, retrieval={"dim": 8})
    fit = fit_retrieval(model, single)
    assert fit["regularization"] == RETRIEVAL_REGULARIZATIONS[0] and "validation_same_listing_recall_at_10" not in fit
    assert model.embed(images=[_photos(1)[0]]).shape == (1, 8)
    photos = splits["train"].products["image_ids"].map(len)
    lonely = {**splits, "train": splits["train"].subset(splits["train"].products["product_id"][photos == 1])}
    with pytest.raises(ModelConfigError, match="two or more photos"):
        fit_retrieval(_tiny(splits["train"].classes, retrieval={"dim": 8}), lonely)


def test_bad_retrieval_settings_are_clear_errors() -> None:
    with pytest.raises(ModelConfigError, match="unknown key"):
        _tiny(retrieval={"size": 8})
    with pytest.raises(ModelConfigError, match="dim must be a positive integer"):
        _tiny(retrieval={"dim": 0})
    with pytest.raises(ModelConfigError, match="exceeds the descriptor"):
        _tiny(retrieval={"dim": 100_000})
    with pytest.raises(ModelConfigError, match="no retrieval descriptor"):
        _tiny().retrieval_descriptors(_photos(1))

"""The checkpoint format: round trips, strict loading with clear errors, and the rendered model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from marketplace_reco.models import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMixin,
    CheckpointNotFoundError,
    TorchCheckpointMixin,
    UnknownModelTypeError,
    create_model,
    load_model,
    register_model,
)


@register_model("test-affine")
class Affine(CheckpointMixin):
    """A tiny numpy classifier: softmax(x @ weights + bias)."""

    input_kind = "image"
    description = "Test model: an affine map and a softmax."

    def __init__(self, classes: list[str], n_inputs: int = 3) -> None:
        self.classes = list(classes)
        self.weights = np.zeros((n_inputs, len(classes)), dtype=np.float32)
        self.bias = np.zeros(len(classes), dtype=np.float32)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "bias": self.bias}

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights, self.bias = arrays["weights"], arrays["bias"]


@register_model("test-torch-linear")
class TorchLinear(torch.nn.Module, TorchCheckpointMixin):
    input_kind = "image"
    description = "Test model: one torch linear layer."

    def __init__(self, classes: list[str], n_inputs: int = 4) -> None:
        super().__init__()
        self.classes = list(classes)
        self.linear = torch.nn.Linear(n_inputs, len(classes))


CLASSES = ["bikes", "chairs", "lamps"]
METRICS = {
    "split": "test", "n_samples": 12, "accuracy": 0.75, "macro_f1": 0.7123,
    "per_class": {name: {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 4} for name in CLASSES},
    "timing_s": {"training": 1.5},
}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = Affine(CLASSES, n_inputs=3)
    model.weights = np.arange(9, dtype=np.float32).reshape(3, 3)
    model.bias = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    model.metrics = METRICS
    model.data_summary = {"products": 60, "images": 90}
    model.save_pretrained(tmp_path / "affine")
    return tmp_path / "affine"


def _rewrite_weights(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a well-formed weights file (valid checksums of every array and of config.json) with other arrays."""
    checksums = {key: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for key, v in arrays.items()}
    files = {"config.json": hashlib.sha256((path.parent / "config.json").read_bytes()).hexdigest()}
    save_file(arrays, str(path), metadata={"format": "np", "sha256": json.dumps(checksums),
                                           "files_sha256": json.dumps(files)})


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_round_trip_keeps_arrays_config_and_metrics(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "test-affine"
    assert config["format_version"] == FORMAT_VERSION
    assert config["classes"] == CLASSES and config["n_inputs"] == 3
    assert config["metrics"]["accuracy"] == 0.75 and config["data_summary"] == {"products": 60, "images": 90}

    model = load_model(str(saved))
    assert isinstance(model, Affine)
    np.testing.assert_array_equal(model.weights, np.arange(9, dtype=np.float32).reshape(3, 3))
    np.testing.assert_array_equal(model.bias, [0.5, -1.0, 2.0])
    assert model.metrics == METRICS and model.classes == CLASSES
    assert model.source["folder"] == str(saved) and len(model.source["revision"]) == 12


def test_torch_model_round_trip(tmp_path: Path) -> None:
    model = TorchLinear(CLASSES, n_inputs=4)
    folder = tmp_path / "linear"
    model.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert isinstance(loaded, TorchLinear) and not loaded.training
    torch.testing.assert_close(loaded.linear.weight, model.linear.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.linear.bias, model.linear.bias, rtol=0, atol=0)


def test_create_model_builds_an_untrained_model_of_the_type() -> None:
    model = create_model("test-affine", classes=CLASSES, n_inputs=5)
    assert isinstance(model, Affine) and model.weights.shape == (5, 3)
    with pytest.raises(UnknownModelTypeError, match="unknown model type 'no-such-type'.*test-affine"):
        create_model("no-such-type")


def test_missing_key_names_file_and_key(saved: Path) -> None:
    arrays = _read_weights(saved / "model.safetensors")
    del arrays["bias"]
    _rewrite_weights(saved / "model.safetensors", arrays)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing keys \['bias'\], unexpected keys \[\]"):
        load_model(str(saved))


def test_unexpected_key_names_file_and_key(saved: Path) -> None:
    arrays = _read_weights(saved / "model.safetensors")
    arrays["extra.scale"] = np.ones(3, dtype=np.float32)
    _rewrite_weights(saved / "model.safetensors", arrays)
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: missing keys \[\], unexpected keys \['extra\.scale'\]"):
        load_model(str(saved))


def test_wrong_shape_names_file_key_and_shapes(saved: Path) -> None:
    _edit_config(saved, n_inputs=4)  # the config now promises a (4, 3) weight matrix
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'weights' has shape \(3, 3\), "
                                              r"the configuration expects \(4, 3\)"):
        load_model(str(saved))


def test_unknown_model_type_names_config_file(saved: Path) -> None:
    _edit_config(saved, model_type="resnet-9000")
    with pytest.raises(UnknownModelTypeError, match=r"config\.json: unknown model type 'resnet-9000'"):
        load_model(str(saved))


def test_newer_format_version_is_refused(saved: Path) -> None:
    _edit_config(saved, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=rf"config\.json: format_version {FORMAT_VERSION + 1} is newer"):
        load_model(str(saved))


def test_corrupted_array_bytes_fail_their_checksum(saved: Path) -> None:
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last array's data: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key '\w+' does not match its sha256; .*corrupted"):
        load_model(str(saved))


def test_truncated_or_garbage_weights_are_unreadable(saved: Path) -> None:
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(str(saved))


def test_weights_without_checksums_are_refused(saved: Path) -> None:
    arrays = _read_weights(saved / "model.safetensors")
    save_file(arrays, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header has no valid 'sha256' entry"):
        load_model(str(saved))


def test_missing_files_are_named(saved: Path, tmp_path: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or missing"):
        load_model(str(saved))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match=rf"no checkpoint at {empty}: no config\.json there"):
        load_model(str(empty))


def test_bad_config_keys_are_named(saved: Path) -> None:
    _edit_config(saved, dropout=0.5)
    with pytest.raises(CheckpointError,
                       match=r"config\.json: unexpected keys \['dropout'\] for model type 'test-affine'"):
        load_model(str(saved))
    config = json.loads((saved / "config.json").read_text())
    del config["dropout"], config["classes"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: missing keys \['classes'\]"):
        load_model(str(saved))
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(str(saved))


def test_from_pretrained_refuses_another_model_type(saved: Path) -> None:
    with pytest.raises(CheckpointError,
                       match=r"model_type is 'test-affine', but TorchLinear loads 'test-torch-linear'"):
        TorchLinear.from_pretrained(str(saved))


def test_model_card_renders_classes_metrics_and_loading(saved: Path) -> None:
    card = (saved / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: marketplace_reco" in card
    assert "# test-affine" in card and "Test model: an affine map and a softmax." in card
    assert "Input kind: **image**" in card
    assert "0. bikes\n1. chairs\n2. lamps" in card
    assert "| accuracy | 0.7500 |" in card and "| macro-F1 | 0.7123 |" in card
    assert "| lamps | 0.800 | 0.700 | 0.750 | 4 |" in card
    assert '"products": 60' in card
    assert 'Further figures:\n\n```json\n{\n  "timing_s": {\n    "training": 1.5' in card
    assert 'proba = model.predict_proba(images=[Image.open("photo.jpg")])' in card and "## Limitations" in card


def test_resave_rewrites_the_card(saved: Path) -> None:
    model = load_model(str(saved))
    model.metrics = {**METRICS, "accuracy": 0.5}
    model.save_pretrained(saved)
    assert "| accuracy | 0.5000 |" in (saved / "README.md").read_text()


def test_an_edited_config_is_refused_even_when_it_still_fits(saved: Path) -> None:
    _edit_config(saved, classes=["bikes", "chairs", "lampshades"])  # same shapes: only the checksum can tell
    with pytest.raises(CheckpointError,
                       match=r"config\.json: does not match the sha256 recorded in model\.safetensors"):
        load_model(str(saved))


def test_non_finite_weights_are_refused_with_the_tensor_name(saved: Path) -> None:
    arrays = _read_weights(saved / "model.safetensors")
    arrays["weights"][1, 2] = np.nan
    _rewrite_weights(saved / "model.safetensors", arrays)  # checksums recomputed: only the values are wrong
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'weights' holds 1 non-finite value"):
        load_model(str(saved))


def test_files_that_are_not_part_of_the_format_are_reported(saved: Path, caplog: pytest.LogCaptureFixture) -> None:
    (saved / "model.pkl").write_bytes(b"\x80\x04N.")
    (saved / "notes.bin.exe").write_bytes(b"?")
    (saved / "confusion_matrix.png").write_bytes(b"png")  # what a training run writes: documentation
    with caplog.at_level("WARNING", logger="marketplace_reco.models._checkpoint"):
        model = load_model(str(saved))
    assert isinstance(model, Affine)
    assert "model.pkl: pickle-type file(s) are never loaded" in caplog.text
    assert "not part of the checkpoint format and are ignored: notes.bin.exe" in caplog.text
    assert "confusion_matrix.png" not in caplog.text


def test_a_format_1_checkpoint_loads_with_a_warning(saved: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints saved before config.json was checksummed still load; the warning says how to protect them."""
    arrays = _read_weights(saved / "model.safetensors")
    checksums = {key: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for key, v in arrays.items()}
    save_file(arrays, str(saved / "model.safetensors"), metadata={"format": "np", "sha256": json.dumps(checksums)})
    _edit_config(saved, format_version=1)
    with caplog.at_level("WARNING", logger="marketplace_reco.models._checkpoint"):
        model = load_model(str(saved))
    np.testing.assert_array_equal(model.bias, [0.5, -1.0, 2.0])
    assert "format version 1 records no checksum of config.json" in caplog.text


@register_model("test-with-vocabulary")
class WithVocabulary(Affine):
    """An Affine that keeps a word list in a file of its own, as a tokenizer does."""

    def __init__(self, classes: list[str], n_inputs: int = 3) -> None:
        super().__init__(classes, n_inputs)
        self.words = ["sofa", "drill"]

    def _save_extra_files(self, folder: Path) -> list[str]:
        (folder / "vocabulary").mkdir(exist_ok=True)
        (folder / "vocabulary" / "words.txt").write_text("\n".join(self.words))
        return ["vocabulary/words.txt"]


def test_extra_files_are_checksummed_like_the_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "with-vocabulary"
    WithVocabulary(CLASSES).save_pretrained(folder)
    with caplog.at_level("WARNING", logger="marketplace_reco.models._checkpoint"):
        assert isinstance(load_model(str(folder)), WithVocabulary)
    assert "not part of the checkpoint format" not in caplog.text  # the header vouches for it
    (folder / "vocabulary" / "words.txt").write_text("sofa\nchainsaw")
    with pytest.raises(CheckpointError, match=r"vocabulary/words\.txt: does not match the sha256 recorded"):
        load_model(str(folder))
    (folder / "vocabulary" / "words.txt").unlink()
    with pytest.raises(CheckpointError, match=r"vocabulary/words\.txt: missing; the checkpoint needs it"):
        load_model(str(folder))

"""Text CNN: learning, the self-contained checkpoint, odd inputs, the training script, and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax

from marketplace_reco.models import load_model
from marketplace_reco.models.text_cnn import TextCNN
from marketplace_reco.models.word2vec import PAD_INDEX, Word2VecEmbedding
from marketplace_reco.training.text_cnn import TextCNNTrainConfig, _AdversarialLoss, train
from marketplace_reco.training.word2vec import train_vectors
from text_marketplaces import text_splits

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Home & Garden", "Phones", "Tools"]
_TOPICS = ["sofa chair table wardrobe drawers oak", "iphone charger screen battery unlocked case",
           "drill hammer saw screwdriver bosch spanner"]


def _data(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    texts = [" ".join(rng.choice(_TOPICS[label].split(), 4)) + " good condition collection only" for label in labels]
    return texts, labels


@pytest.fixture(scope="module")
def embedding() -> Word2VecEmbedding:
    texts, _ = _data(45, seed=0)
    return train_vectors(texts, dim=16, window=3, negative=5, min_count=1, epochs=50, workers=1, progress=False)


def _model(embedding: Word2VecEmbedding, **hyperparameters: object) -> TextCNN:
    torch.manual_seed(0)
    return TextCNN.from_word2vec(embedding, CLASSES, **{"max_length": 12, "kernel_sizes": [1, 2, 3], "num_filters": 16,
                                                        "feature_dim": 12, "dropout": 0.2, "ensemble_size": 2,
                                                        **hyperparameters})


@pytest.fixture(scope="module")
def trained(embedding: Word2VecEmbedding) -> TextCNN:
    model = _model(embedding, fine_tune_embedding=True)
    train_texts, train_labels = _data(45, seed=0)
    val_texts, val_labels = _data(15, seed=1)
    train(model, text_splits((train_texts, train_labels), (val_texts, val_labels), CLASSES),
          TextCNNTrainConfig(epochs=10, batch_size=8, learning_rate=0.02, patience=10))
    return model


def test_the_cnn_learns_and_fine_tunes_the_embedding_but_never_the_padding_row(
    trained: TextCNN, embedding: Word2VecEmbedding
) -> None:
    texts, labels = _data(30, seed=2)
    assert (trained.predict_proba(texts=texts).argmax(axis=1) == labels).mean() >= 0.9
    for member in trained.members:
        weights = member.embedding.weight.detach().numpy()
        assert not np.allclose(weights[2:], embedding.vectors[2:])
        assert not weights[PAD_INDEX].any()
    assert trained.config["word2vec"] == {"name": "in memory", "revision": ""}
    assert not trained.training  # left ready for inference


def test_a_frozen_embedding_stays_the_word2vec_vectors(embedding: Word2VecEmbedding) -> None:
    model = _model(embedding)
    texts, labels = _data(24, seed=3)
    train(model, text_splits((texts, labels), (texts, labels), CLASSES),
          TextCNNTrainConfig(epochs=2, batch_size=8, learning_rate=0.02))
    for member in model.members:
        assert not member.embedding.weight.requires_grad
        np.testing.assert_array_equal(member.embedding.weight.detach().numpy(), embedding.vectors)


def _calibrated(member_proba: np.ndarray, temperature: float) -> np.ndarray:
    """The model's probabilities from its members': their mean, sharpened or softened by the temperature."""
    return softmax(np.log(member_proba.mean(axis=1)) / temperature, axis=1)


def test_members_train_apart_and_the_model_averages_their_probabilities(embedding: Word2VecEmbedding) -> None:
    model = _model(embedding, ensemble_size=3)
    texts, labels = _data(24, seed=6)
    result = train(model, text_splits((texts, labels), (texts, labels), CLASSES),
                   TextCNNTrainConfig(epochs=3, batch_size=8, learning_rate=0.02, patience=3))
    assert [row["member"] for row in result.history] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(result.metrics["best_epochs"]) == 3 and 0 <= result.metrics["validation_accuracy"] <= 1
    members = model.predict_member_proba(texts)
    assert members.shape == (24, 3, 3)
    assert not np.allclose(members[:, 0], members[:, 1])  # own seeds: own weights
    np.testing.assert_allclose(model.predict_proba(texts=texts), _calibrated(members, model.temperature), atol=1e-6)


def test_training_fits_the_temperature_on_the_validation_texts(embedding: Word2VecEmbedding) -> None:
    model = _model(embedding, fine_tune_embedding=True)
    train_texts, train_labels = _data(45, seed=0)
    val_texts, val_labels = _data(30, seed=8)
    val_labels = np.where(np.arange(30) % 4 == 0, (val_labels + 1) % 3, val_labels)  # noisy labels, as in real data
    result = train(model, text_splits((train_texts, train_labels), (val_texts, val_labels), CLASSES),
                   TextCNNTrainConfig(epochs=10, batch_size=8, learning_rate=0.02, patience=10, label_smoothing=0.0))
    calibration = result.metrics["calibration"]
    assert model.temperature == calibration["temperature"] == model.config["temperature"] != 1.0
    assert 0.0 <= calibration["validation_ece_after"] <= 1.0 and calibration["fitted_on"] == "validation texts"

    def nll() -> float:
        proba = model.predict_proba(texts=val_texts)
        return float(-np.log(proba[np.arange(30), val_labels]).mean())

    calibrated = nll()
    model.calibrate(1.0)
    assert calibrated < nll()


def test_a_checkpoint_without_a_temperature_loads_uncalibrated(trained: TextCNN, tmp_path: Path) -> None:
    config = trained.init_arguments()
    del config["temperature"]  # as saved before calibration existed
    trained._hub_mixin_config = config
    try:
        trained.save_pretrained(tmp_path / "old")
    finally:
        trained._record_config(temperature=trained.temperature)
    loaded = load_model(str(tmp_path / "old"))
    texts, _ = _data(5, seed=9)
    assert loaded.temperature == 1.0
    np.testing.assert_allclose(loaded.predict_proba(texts=texts), trained.predict_member_proba(texts).mean(axis=1),
                               atol=1e-6)


@pytest.mark.parametrize("fine_tune", [True, False])
def test_adversarial_training_adds_the_loss_at_word_vectors_moved_uphill(embedding: Word2VecEmbedding,
                                                                          fine_tune: bool) -> None:
    model = _model(embedding, dropout=0.0, fine_tune_embedding=fine_tune)
    member = model.members[0]
    texts, labels = _data(8, seed=7)
    ids, targets = torch.from_numpy(model.encode(texts).ids), torch.tensor(labels)
    loss = _AdversarialLoss(member, epsilon=0.5, label_smoothing=0.1)
    try:
        member.train()
        clean = torch.nn.functional.cross_entropy(member(ids), targets, label_smoothing=0.1)
        combined = loss(member(ids), targets)
        adversarial = 2 * combined - clean  # the loss averages the clean and the adversarial loss
        assert float(adversarial.detach()) > float(clean.detach()) + 1e-3
        combined.backward()  # one backward reaches the weights through both passes
        assert member.convs[0].weight.grad is not None
        assert (member.embedding.weight.grad is not None) == fine_tune
        member.eval()
        with torch.no_grad():  # validation: the plain loss, no hook at work
            torch.testing.assert_close(loss(member(ids), targets),
                                       torch.nn.functional.cross_entropy(member(ids), targets, label_smoothing=0.1))
    finally:
        loss.close()
    assert not member.embedding._forward_hooks


def test_empty_and_unknown_inputs_still_get_a_full_probability_row(trained: TextCNN) -> None:
    texts = ["", "zeppelin quixotic", "the and of", "   ", "sofa zeppelin"]
    proba = trained.predict_proba(texts=texts)
    assert proba.shape == (5, 3) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert trained.known_token_counts(texts).tolist() == [0, 0, 0, 0, 1]
    # With no known word every such input is the same single <unk>: the same answer.
    np.testing.assert_allclose(proba[0], proba[1], rtol=1e-6)
    assert trained.predict_proba(texts=[]).shape == (0, 3)
    with pytest.raises(ValueError, match="needs texts"):
        trained.predict_proba(images=["a photo"])


def test_padding_and_batching_never_change_a_prediction(trained: TextCNN) -> None:
    texts, _ = _data(9, seed=4)
    texts += ["drill", "sofa chair table wardrobe drawers oak sofa chair table wardrobe drawers oak sofa chair"]
    together = trained.predict_proba(texts=texts)
    alone = np.concatenate([trained.predict_proba(texts=[text]) for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    ids = torch.from_numpy(trained.encode(texts).ids)
    with torch.inference_mode():
        wider = torch.nn.functional.pad(ids, (0, 20), value=PAD_INDEX)
        np.testing.assert_allclose(trained(ids).numpy(), trained(wider).numpy(), atol=1e-5)


def test_features_are_the_members_layers_under_their_classifiers(trained: TextCNN) -> None:
    texts, _ = _data(6, seed=5)
    features = trained.extract_features(texts)
    assert features.shape == (6, 2 * 12) == (6, trained.feature_dim) and (features >= 0).all()
    with torch.inference_mode():
        member_proba = [torch.softmax(member.classifier(torch.from_numpy(part)), dim=1).numpy()
                        for member, part in zip(trained.members, np.split(features, 2, axis=1), strict=True)]
    np.testing.assert_allclose(_calibrated(np.stack(member_proba, axis=1), trained.temperature),
                               trained.predict_proba(texts=texts), atol=1e-6)


def test_checkpoint_predicts_identically_in_a_fresh_process(trained: TextCNN, tmp_path: Path) -> None:
    folder = tmp_path / "text-cnn"
    trained.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocabulary"][:2] == ["<pad>", "<unk>"] and config["max_length"] == 12
    assert "the" in config["preprocessing"]["stop_words"] and config["kernel_sizes"] == [1, 2, 3]
    texts = ["Oak wardrobe | in Leeds, West Yorkshire | Gumtree", "iPhone 12 unlocked, charger included", "", "xyzzy"]
    script = ("import json, sys; from marketplace_reco.models import load_model; "
              "m = load_model(sys.argv[1]); texts = json.loads(sys.argv[2]); "
              "print(json.dumps({'proba': m.predict_proba(texts=texts).tolist(), "
              "'known': m.known_token_counts(texts).tolist(), 'type': type(m).__name__}))")
    completed = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(texts)], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    fresh = json.loads(completed.stdout.strip().splitlines()[-1])
    assert fresh["type"] == "TextCNN"
    np.testing.assert_allclose(fresh["proba"], trained.predict_proba(texts=texts), atol=1e-6)
    assert fresh["known"] == trained.known_token_counts(texts).tolist() == [2, 3, 0, 0]
    assert isinstance(load_model(str(folder)), TextCNN)


def _run(args: list[str], checkpoints: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MARKETPLACE_CHECKPOINTS": str(checkpoints),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([*(launcher or [sys.executable]), *args], capture_output=True, text=True, env=env,
                          timeout=600)


_SMALL = ["--epochs", "2", "--num-filters", "8", "--feature-dim", "8", "--max-length", "32", "--batch-size", "16",
          "--ensemble-size", "2"]


def test_scripts_train_word2vec_then_the_cnn_on_the_sample(sample_data: dict[str, str], tmp_path: Path) -> None:
    data = ["--db-url", sample_data["db_url"], "--images", sample_data["image_location"]]
    scripts = REPO_ROOT / "scripts"
    word2vec = _run([str(scripts / "train_word2vec.py"), *data, "--dim", "16", "--epochs", "3", "--plot-method",
                     "pca"], tmp_path)
    assert word2vec.returncode == 0, word2vec.stderr[-3000:]
    cnn = _run([str(scripts / "train_text_cnn.py"), *data, *_SMALL], tmp_path)
    assert cnn.returncode == 0, cnn.stderr[-3000:]
    folder = tmp_path / "text-cnn"
    for name in ("config.json", "model.safetensors", "README.md", "confusion_matrix.png", "training_curves.png",
                 "history.json"):
        assert (folder / name).is_file(), name
    model = load_model(str(folder))
    assert model.metrics["split"] == "test" and 0.0 <= model.metrics["macro_f1"] <= 1.0
    assert model.metrics["processes"] == 1 and len(model.metrics["per_class"]) == 13
    assert len(model.members) == 2 and len(model.metrics["best_epochs"]) == 2
    assert 0.0 <= model.metrics["validation_accuracy"] <= 1.0 and 0.0 <= model.metrics["ece"] <= 1.0
    assert model.config["temperature"] == model.metrics["calibration"]["temperature"]
    assert {row["member"] for row in json.loads((folder / "history.json").read_text())} == {1, 2}
    assert model.config["word2vec"]["name"] == "word2vec" and model.config["fine_tune_embedding"] is False
    assert "| accuracy |" in (folder / "README.md").read_text()
    assert "| expected calibration error (15 bins) |" in (folder / "README.md").read_text()

    # An embedding trained on another split may have read this split's test listings: refused.
    refused = _run([str(scripts / "train_text_cnn.py"), *data, *_SMALL, "--seed", "1"], tmp_path)
    assert refused.returncode == 1
    assert "trained on a different set of products" in refused.stderr and "Traceback" not in refused.stderr


def test_train_text_cnn_runs_unchanged_under_torchrun(sample_data: dict[str, str], tmp_path: Path) -> None:
    completed = _run(
        [str(REPO_ROOT / "scripts" / "train_text_cnn.py"), "--db-url", sample_data["db_url"], "--images",
         sample_data["image_location"], "--train-word2vec", "--word2vec", "w2v-ddp", "--fine-tune-embedding",
         *_SMALL],
        tmp_path, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "w2v-ddp" / "embedding_2d.png").is_file()
    model = load_model(str(tmp_path / "text-cnn"))
    assert model.metrics["processes"] == 2
    assert model.config["word2vec"]["name"] == "w2v-ddp" and model.config["fine_tune_embedding"] is True
    assert len(json.loads((tmp_path / "text-cnn" / "history.json").read_text())) >= 1

"""Text transformer: fine-tuning, the self-contained checkpoint (fresh process, hub, strict keys), odd texts, serving,
fusion with it as the text branch, the training script and torchrun.

Every encoder here is a tiny BERT the test builds itself (random weights, a word-level WordPiece vocabulary): no
download, and the hub variables stay untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.models import CheckpointError, ModelConfigError, load_model, pull_checkpoint
from marketplace_reco.models.fusion import FusionClassifier
from marketplace_reco.models.image_classifier import ImageClassifier
from marketplace_reco.models.text_transformer import PretrainedEncoderError, TextTransformerClassifier
from marketplace_reco.serving import Predictor, ServingSettings, create_app
from marketplace_reco.training import fusion
from marketplace_reco.training.text_transformer import LEXICAL_WEIGHTS, TextTransformerTrainConfig, train
from test_serving_http import RED, LoopbackServer, error_message
from text_marketplaces import text_splits

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Home & Garden", "Phones", "Tools"]
_TOPICS = ["sofa chair table wardrobe drawers oak", "iphone charger screen battery unlocked case",
           "drill hammer saw screwdriver bosch spanner"]
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_encoder(folder: Path, texts: Iterable[str], seed: int = 0, max_positions: int = 128) -> Path:
    """A tiny random BERT and a WordPiece tokenizer whose vocabulary is the words of ``texts`` (and punctuation)."""
    words = sorted({word for text in texts for word in re.findall(r"[a-z0-9]+", text.lower())})
    vocab = [*_SPECIALS, *words, *".,!?-'&|/()£:;"]
    BertTokenizerFast(vocab={piece: index for index, piece in enumerate(vocab)}).save_pretrained(str(folder))
    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=max_positions))
    # Word vectors as far apart as pretrained ones (BERT's initialisation leaves them as small as the position
    # embeddings, and training keeps them frozen).
    torch.nn.init.normal_(encoder.embeddings.word_embeddings.weight, std=1.0)
    encoder.save_pretrained(str(folder))
    return folder


def _data(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    texts = [" ".join(rng.choice(_TOPICS[label].split(), 4)) + " good condition, collection only" for label in labels]
    return texts, labels


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("encoder"), [*_TOPICS, "good condition collection only"])


def _model(encoder: Path, **hyperparameters: object) -> TextTransformerClassifier:
    torch.manual_seed(0)
    return TextTransformerClassifier(CLASSES, encoder=str(encoder), **{"max_length": 16, "head_length": 10,
                                                                     "feature_dim": 12, **hyperparameters})


_FAST = {"epochs": 4, "batch_size": 8, "learning_rate": 3e-3, "patience": 4}


@pytest.fixture(scope="module")
def trained(encoder: Path) -> TextTransformerClassifier:
    model = _model(encoder)
    train(model, text_splits(_data(45, seed=0), _data(15, seed=1), CLASSES), TextTransformerTrainConfig(**_FAST))
    return model


TEXTS = ["Oak wardrobe, good condition", "iPhone charger unlocked", "", "xyzzy qwerty", "bosch drill " * 20]


# ---- learning ---------------------------------------------------------------------------------------
def test_fine_tuning_learns_keeps_word_embeddings_and_fits_the_temperature(encoder: Path) -> None:
    model = _model(encoder)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    splits = text_splits(_data(45, seed=0), _data(15, seed=1), CLASSES)
    result = train(model, splits, TextTransformerTrainConfig(**_FAST))
    val_texts, val_labels = _data(15, seed=1)
    assert (model.predict_proba(texts=val_texts).argmax(axis=1) == val_labels).mean() >= 0.9
    assert result.metrics["validation_accuracy"] >= 0.9 and 1 <= result.metrics["best_epoch"] <= 4
    assert model.config["temperature"] == result.metrics["calibration"]["temperature"] != 1.0
    assert [row["epoch"] for row in result.history] == list(range(1, len(result.history) + 1))
    after = model.state_dict()
    assert torch.equal(after["encoder.embeddings.word_embeddings.weight"],
                       before["encoder.embeddings.word_embeddings.weight"])
    assert not torch.equal(after["encoder.encoder.layer.0.attention.self.query.weight"],
                           before["encoder.encoder.layer.0.attention.self.query.weight"])
    assert not any(key.startswith("encoder.pooler") for key in after)  # unused by mean pooling: not kept


def test_trainable_layers_fine_tunes_only_the_last_ones(encoder: Path) -> None:
    model = _model(encoder)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    train(model, text_splits(_data(30, seed=0), _data(9, seed=1), CLASSES),
          TextTransformerTrainConfig(**{**_FAST, "epochs": 1}, trainable_layers=1, bf16=False, accumulation_steps=2))
    changed = {key for key, value in model.state_dict().items() if not torch.equal(before[key], value)}
    # The lexical head is fitted after the encoder, whatever part of the encoder trains.
    assert changed and all(key.startswith(("encoder.encoder.layer.1.", "feature.", "classifier.", "lexical."))
                           for key in changed)
    assert any(key.startswith("encoder.encoder.layer.1.") for key in changed)


def test_an_unreachable_encoder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PretrainedEncoderError, match=r"cannot load the pretrained encoder '.*nowhere'.*setup_hf_cache"):
        TextTransformerClassifier(CLASSES, encoder=str(tmp_path / "nowhere"))


# ---- raw text ---------------------------------------------------------------------------------------
def test_empty_and_unknown_texts_get_a_row_and_count_no_known_word_piece(trained: TextTransformerClassifier) -> None:
    proba = trained.predict_proba(texts=TEXTS)
    assert proba.shape == (len(TEXTS), 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert trained.known_token_counts(TEXTS).tolist() == [5, 3, 0, 0, 40]
    assert trained.predict_proba(texts=[]).shape == (0, 3)


def test_long_texts_keep_their_head_and_tail(trained: TextTransformerClassifier) -> None:
    tokenizer = trained.tokenizer
    words = " ".join(_TOPICS).split()  # 18 known words: 10 from the head and 4 from the tail fit in 16 pieces
    ids = trained.tokenize([" ".join(words)]).ids[0]
    assert len(ids) == 16 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    pieces = tokenizer.convert_tokens_to_ids(words)
    assert ids[1:11] == pieces[:10] and ids[11:15] == pieces[-4:]


def test_batching_and_padding_never_change_a_prediction(trained: TextTransformerClassifier) -> None:
    together = trained.predict_proba(texts=TEXTS)
    alone = np.concatenate([trained.predict_proba(texts=[text]) for text in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_embed_gives_unit_rows_of_the_feature_layer(trained: TextTransformerClassifier) -> None:
    vectors = trained.embed(texts=TEXTS[:2])
    assert vectors.dtype == np.float32 and vectors.shape == (2, trained.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    features = trained.extract_features(TEXTS[:2])
    np.testing.assert_allclose(vectors, features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-5)


# ---- checkpoint -------------------------------------------------------------------------------------
def test_checkpoint_predicts_identically_in_a_fresh_process_without_network(trained: TextTransformerClassifier,
                                                                            tmp_path: Path) -> None:
    folder = tmp_path / "text-transformer"
    trained.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "text-transformer" and config["encoder_config"]["model_type"] == "bert"
    assert config["max_length"] == 16 and config["head_length"] == 10
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    script = ("import json, sys; from marketplace_reco.models import load_model; "
              "m = load_model(sys.argv[1]); texts = json.loads(sys.argv[2]); "
              "print(json.dumps({'proba': m.predict_proba(texts=texts).tolist(), "
              "'known': m.known_token_counts(texts).tolist(), 'type': type(m).__name__}))")
    # The hub is unreachable: the encoder is built from config.json and the tokenizer read from the checkpoint.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    completed = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(TEXTS)], capture_output=True,
                               text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    fresh = json.loads(completed.stdout.strip().splitlines()[-1])
    assert fresh["type"] == "TextTransformerClassifier"
    np.testing.assert_allclose(fresh["proba"], trained.predict_proba(texts=TEXTS), atol=1e-6)
    assert fresh["known"] == trained.known_token_counts(TEXTS).tolist()


def test_load_model_by_name_and_push_pull_through_the_local_hub(trained: TextTransformerClassifier, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPLACE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MARKETPLACE_CACHE", str(tmp_path / "cache"))
    revision = trained.push_to_hub("transformer", revision="v1")
    loaded = load_model("transformer", revision="v1")
    assert isinstance(loaded, TextTransformerClassifier) and loaded.source["revision"] == revision
    np.testing.assert_allclose(loaded.predict_proba(texts=TEXTS), trained.predict_proba(texts=TEXTS), atol=1e-6)
    pulled = pull_checkpoint("transformer", tmp_path / "pulled", revision="v1")
    assert sorted(path.relative_to(pulled).as_posix() for path in pulled.rglob("*") if path.is_file()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    by_path = load_model(str(pulled))
    np.testing.assert_allclose(by_path.predict_proba(texts=TEXTS), trained.predict_proba(texts=TEXTS), atol=1e-6)


def test_a_tampered_checkpoint_is_refused(trained: TextTransformerClassifier, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    trained.save_pretrained(folder)

    extra = tmp_path / "extra-key"
    shutil.copytree(folder, extra)
    arrays = load_file(str(extra / "model.safetensors"))
    arrays["encoder.pooler.dense.weight"] = np.zeros((32, 32), dtype=np.float32)
    save_file(arrays, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['encoder.pooler.dense.weight'\]"):
        load_model(str(extra))

    missing = tmp_path / "missing-key"
    shutil.copytree(folder, missing)
    arrays = load_file(str(missing / "model.safetensors"))
    del arrays["classifier.weight"]
    save_file(arrays, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['classifier.weight'\]"):
        load_model(str(missing))

    edited = tmp_path / "edited-tokenizer"
    shutil.copytree(folder, edited)
    tokenizer_file = edited / "tokenizer" / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text().replace('"sofa"', '"sofas"'))
    with pytest.raises(CheckpointError, match="tokenizer.json: does not match the sha256"):
        load_model(str(edited))

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(folder, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        load_model(str(no_tokenizer))


# ---- fusion -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_splits(sample_marketplace: Marketplace) -> dict[str, Marketplace]:
    return sample_marketplace.split((0.6, 0.2, 0.2), seed=0)


@pytest.fixture(scope="module")
def sample_encoder(sample_marketplace: Marketplace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("sample-encoder"), sample_marketplace.products["text"])


@pytest.fixture(scope="module")
def fusion_folder(sample_splits: dict[str, Marketplace], sample_encoder: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A late-head fusion of a tiny image classifier and a text transformer (fitted on validation), saved."""
    classes = sample_splits["train"].classes
    torch.manual_seed(0)
    image = ImageClassifier(classes, backbone="test_resnet", preprocessing={"image_size": 32}, feature_dim=16)
    text = TextTransformerClassifier(classes, encoder=str(sample_encoder), max_length=32, head_length=24,
                                     feature_dim=12)
    model = FusionClassifier.from_branches(image, text)
    fusion.train(model, sample_splits, fusion.FusionTrainConfig(late_l2=[0.1]))
    folder = tmp_path_factory.mktemp("fusion") / "fusion"
    model.save_pretrained(folder)
    return folder


def test_fusion_with_a_transformer_text_branch_saves_loads_and_predicts(fusion_folder: Path,
                                                                       sample_splits: dict[str, Marketplace]) -> None:
    assert (fusion_folder / "text_branch" / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((fusion_folder / "config.json").read_text())
    assert config["text_config"]["model_type"] == "text-transformer"
    model = load_model(str(fusion_folder))
    assert isinstance(model, FusionClassifier) and isinstance(model.text_branch, TextTransformerClassifier)
    products = sample_splits["test"].products.head(4)
    photos = sample_splits["test"].load_images([ids[0] for ids in products["image_ids"]])
    texts = products["text"].tolist()
    both = model.predict_proba(images=photos, texts=texts)
    assert both.shape == (4, len(model.classes)) and np.allclose(both.sum(axis=1), 1.0, atol=1e-5)
    # A listing without a photo is answered by the text branch alone, calibrated as on its own.
    text_only = model.predict_proba(images=[None] * 4, texts=texts)
    np.testing.assert_allclose(text_only, model.text_branch.predict_proba(texts=texts), atol=1e-6)
    np.testing.assert_allclose(model.known_token_counts(texts), model.text_branch.known_token_counts(texts))
    again = load_model(str(fusion_folder)).predict_proba(images=photos, texts=texts)
    np.testing.assert_allclose(again, both, atol=1e-6)
    # Listing vectors: [image part | transformer part], both present: each part / sqrt(2).
    vectors = model.embed(images=photos, texts=texts)
    assert vectors.shape == (4, model.embedding_dim) and model.embedding_dim == \
        model.image_branch.embedding_dim + model.text_branch.embedding_dim
    np.testing.assert_allclose(vectors[:, model.image_branch.embedding_dim:] * np.sqrt(2),
                               model.text_branch.embed(texts=texts), atol=1e-5)


def test_a_concat_fusion_reads_the_transformer_s_features(sample_splits: dict[str, Marketplace],
                                                         sample_encoder: Path, tmp_path: Path) -> None:
    classes = sample_splits["train"].classes
    torch.manual_seed(0)
    image = ImageClassifier(classes, backbone="test_resnet", preprocessing={"image_size": 32}, feature_dim=16)
    text = TextTransformerClassifier(classes, encoder=str(sample_encoder), max_length=32, head_length=24,
                                     feature_dim=12)
    model = FusionClassifier.from_branches(image, text, head="concat")
    fusion.train(model, sample_splits, fusion.FusionTrainConfig(epochs=1, batch_size=32))
    model.save_pretrained(tmp_path / "concat")
    products = sample_splits["test"].products.head(3)
    texts = products["text"].tolist()
    photos = sample_splits["test"].load_images([ids[0] for ids in products["image_ids"]])
    np.testing.assert_allclose(load_model(str(tmp_path / "concat")).predict_proba(images=photos, texts=texts),
                               model.predict_proba(images=photos, texts=texts), atol=1e-5)
    with pytest.raises(Exception, match="cannot be unfrozen"):
        FusionClassifier.from_branches(image, text, head="concat", unfrozen=["text"])


# ---- lexical head -----------------------------------------------------------------------------------
def test_a_lexical_head_is_fitted_after_the_encoder_weighted_on_validation_and_saved(encoder: Path,
                                                                                      tmp_path: Path) -> None:
    model = _model(encoder, lexical_features=512)
    result = train(model, text_splits(_data(45, seed=0), _data(15, seed=1), CLASSES),
                   TextTransformerTrainConfig(**_FAST))
    lexical = result.metrics["lexical_head"]
    assert lexical["features"] == 512 and lexical["weight"] in LEXICAL_WEIGHTS
    assert [float(weight) for weight in lexical["weights_tried"]] == list(LEXICAL_WEIGHTS)
    assert model.lexical_weight == lexical["weight"] == model.config["lexical_weight"]
    # The linear SVM over hashed word n-grams alone separates the three topics of the held-out texts.
    texts, labels = _data(30, seed=2)
    assert model.lexical is not None and (model.lexical.scores(texts).argmax(axis=1) == labels).mean() == 1.0
    # n-grams of the training texts weigh their idf (at least 1), the other hashed features nothing.
    idf = model.lexical.idf.numpy()
    assert set(np.flatnonzero(idf)) == set(model.lexical.counts(_data(45, seed=0)[0]).indices)
    assert idf[idf > 0].min() >= 1.0
    # An empty text has no n-gram: its lexical scores are the biases alone.
    np.testing.assert_allclose(model.lexical.scores([""])[0], model.lexical.bias.numpy(), atol=1e-6)
    # The head's arrays travel in model.safetensors (strict keys), its tokenisation in config.json.
    model.save_pretrained(tmp_path / "lexical")
    config = json.loads((tmp_path / "lexical" / "config.json").read_text())
    assert config["lexical_features"] == 512 and "the" in config["lexical_preprocessing"]["stop_words"]
    assert {"lexical.idf", "lexical.weight", "lexical.bias"} <= set(load_file(tmp_path / "lexical" /
                                                                              "model.safetensors"))
    again = load_model(str(tmp_path / "lexical"))
    np.testing.assert_allclose(again.predict_proba(texts=TEXTS), model.predict_proba(texts=TEXTS), atol=1e-6)
    without = _model(encoder, lexical_features=0)
    without.load_state_dict({key: value for key, value in model.state_dict().items()
                             if not key.startswith("lexical.")}, strict=True)
    np.testing.assert_allclose(model.logits(TEXTS), without.logits(TEXTS)
                               + model.lexical_weight * model.lexical.scores(TEXTS), atol=1e-5)


# ---- int8 inference ---------------------------------------------------------------------------------
def _int8_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)]


def test_int8_quantization_runs_the_feed_forward_expansions_in_int8_close_to_the_float_model(
        trained: TextTransformerClassifier, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path / "float")
    model = load_model(str(tmp_path / "float"), quantization="int8")
    assert model.quantization == "int8"
    assert _int8_layers(model) == [f"encoder.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    float_proba = trained.predict_proba(texts=TEXTS)
    proba = model.predict_proba(texts=TEXTS)
    assert proba.shape == float_proba.shape and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(proba, float_proba, atol=0.05)
    vectors = model.embed(texts=TEXTS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(vectors * trained.embed(texts=TEXTS), axis=1)) > 0.98
    # The checkpoint keeps the float weights: a quantized model is for inference only.
    with pytest.raises(ModelConfigError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "quantized")
    assert not (tmp_path / "quantized" / "model.safetensors").exists()
    with pytest.raises(ModelConfigError, match="unknown quantization 'int4'"):
        load_model(str(tmp_path / "float"), quantization="int4")


def test_int8_quantization_reaches_a_fusion_s_transformer_branch(fusion_folder: Path,
                                                                sample_splits: dict[str, Marketplace]) -> None:
    texts = sample_splits["test"].products["text"].head(4).tolist()
    float_proba = load_model(str(fusion_folder)).predict_proba(texts=texts)
    model = load_model(str(fusion_folder), quantization="int8")
    assert model.quantization == "int8"
    assert _int8_layers(model) == [f"text_branch.encoder.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    np.testing.assert_allclose(model.predict_proba(texts=texts), float_proba, atol=0.05)


# ---- serving ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(trained: TextTransformerClassifier, fusion_folder: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    checkpoints = tmp_path_factory.mktemp("served")
    trained.save_pretrained(checkpoints / "text-transformer")
    shutil.copytree(fusion_folder, checkpoints / "fusion")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        settings = ServingSettings(image_model=None, text_model="text-transformer", combined_model="fusion",
                                   max_batch_size=16, max_batch_wait_ms=20, torch_threads=1)
        with LoopbackServer(create_app(settings)) as running:
            running.wait_ready()
            running.checkpoints = checkpoints  # type: ignore[attr-defined]
            yield running


def test_text_and_combined_serve_it_with_meaningful_warnings(server: LoopbackServer) -> None:
    checkpoints: Path = server.checkpoints  # type: ignore[attr-defined]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = client.post("/text", json={"text": TEXTS[0]}).json()
        expected = Predictor.from_pretrained(str(checkpoints / "text-transformer")).predict(text=TEXTS[0])
        assert answer["pred"] == expected.pred and answer["model"] == "text-transformer"
        assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
        assert answer["known_tokens"] == 5 and answer["warning"] is None

        unknown = client.post("/text", json={"text": "xyzzy qwerty"}).json()
        assert unknown["known_tokens"] == 0 and "no word of the text is known" in unknown["warning"]
        assert "empty" in error_message(client.post("/text", json={"text": "  "}), 422, "invalid_input")

        batch = client.post("/text/batch", json={"texts": TEXTS[:2] + TEXTS[3:]}).json()["predictions"]
        assert [p["known_tokens"] for p in batch] == [5, 3, 0, 40]

        photo = ("red.jpg", RED, "image/jpeg")
        combined = client.post("/combined", files={"image": photo}, data={"text": "xyzzy qwerty"}).json()
        assert combined["known_tokens"] == 0 and "rests on the photos alone" in combined["warning"]
        no_text = client.post("/combined", files={"image": photo}, data={"text": ""}).json()
        assert "no text" in no_text["warning"]
        no_photo = client.post("/combined", data={"text": "sofa"}).json()
        assert "no photo" in no_photo["warning"]


def test_a_quantized_server_says_so_and_answers_as_the_quantized_model(server: LoopbackServer) -> None:
    checkpoints: Path = server.checkpoints  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        env.setenv("MARKETPLACE_QUANTIZATION", "int8")
        settings = ServingSettings(image_model=None, text_model="text-transformer", combined_model=None,
                                   torch_threads=1)
        with LoopbackServer(create_app(settings)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
            running.wait_ready()
            assert client.get("/models/text-transformer").json()["quantization"] == "int8"
            answer = client.post("/text", json={"text": TEXTS[0]}).json()
    expected = Predictor.from_pretrained(str(checkpoints / "text-transformer"), quantization="int8").predict(
        text=TEXTS[0])
    assert answer["pred"] == expected.pred
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/models/text-transformer").json()["quantization"] is None
    with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
        ServingSettings(quantization="fp8")


# ---- scripts ----------------------------------------------------------------------------------------
def _run(args: list[str], checkpoints: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MARKETPLACE_CHECKPOINTS": str(checkpoints),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([*(launcher or [sys.executable]), *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def _script_args(sample_data: dict[str, str], encoder: Path) -> list[str]:
    return [str(REPO_ROOT / "scripts" / "train_text_transformer.py"), "--db-url", sample_data["db_url"],
            "--images", sample_data["image_location"], "--encoder", str(encoder), "--max-length", "32",
            "--head-length", "24", "--feature-dim", "8", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3"]


def test_scripts_train_it_then_a_fusion_with_it_on_the_sample(sample_data: dict[str, str], sample_encoder: Path,
                                                               tmp_path: Path) -> None:
    # Validation products: at least two per class, so that the fusion's late head can cross-validate its L2.
    split = ["--val-fraction", "0.25"]
    completed = _run([*_script_args(sample_data, sample_encoder), *split], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    folder = tmp_path / "text-transformer"
    for name in ("config.json", "model.safetensors", "README.md", "confusion_matrix.png", "training_curves.png",
                 "history.json", "tokenizer/tokenizer.json"):
        assert (folder / name).is_file(), name
    model = load_model(str(folder))
    assert model.metrics["split"] == "test" and model.metrics["processes"] == 1
    assert model.config["temperature"] == model.metrics["calibration"]["temperature"]
    assert 0.0 <= model.metrics["accuracy"] <= 1.0 and len(model.metrics["per_class"]) == 13
    assert "| accuracy |" in (folder / "README.md").read_text()

    data = ["--db-url", sample_data["db_url"], "--images", sample_data["image_location"], *split]
    image = _run([str(REPO_ROOT / "scripts" / "train_image.py"), *data, "--no-pretrained", "--backbone", "test_resnet",
                  "--image-size", "32", "--epochs", "1", "--batch-size", "16"], tmp_path)
    assert image.returncode == 0, image.stderr[-3000:]
    combined = _run([str(REPO_ROOT / "scripts" / "train_combined.py"), *data, "--text-model", "text-transformer"],
                    tmp_path)
    assert combined.returncode == 0, combined.stderr[-3000:]
    fused = load_model(str(tmp_path / "fusion"))
    assert isinstance(fused.text_branch, TextTransformerClassifier)
    assert fused.config["text_model"]["name"] == "text-transformer"
    texts = ["Oak wardrobe", "drill"]
    np.testing.assert_allclose(fused.predict_proba(texts=texts), model.predict_proba(texts=texts), atol=1e-6)


def test_script_runs_unchanged_under_torchrun(sample_data: dict[str, str], sample_encoder: Path,
                                              tmp_path: Path) -> None:
    completed = _run([*_script_args(sample_data, sample_encoder), "--epochs", "1", "--accumulation-steps", "2"],
                     tmp_path, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    model = load_model(str(tmp_path / "text-transformer"))
    assert model.metrics["processes"] == 2 and len(json.loads((tmp_path / "text-transformer" /
                                                               "history.json").read_text())) == 1

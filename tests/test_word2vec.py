"""word2vec checkpoint: training, encoding, round trip, and that only training text reaches it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marketplace_reco.data.dataset import load_marketplace
from marketplace_reco.data.importer import import_csv
from marketplace_reco.data.text import TextPreprocessor
from marketplace_reco.models import CheckpointError, load_model
from marketplace_reco.models.word2vec import PAD_INDEX, UNK_INDEX, TokenEncoder, Word2VecEmbedding
from marketplace_reco.training.plots import plot_embedding_2d
from marketplace_reco.training.runs import check_same_split
from marketplace_reco.training.word2vec import _with_label_tokens, probe_words, train_vectors

REPO_ROOT = Path(__file__).resolve().parents[1]
_TOPICS = {
    "furniture": "sofa chair table wardrobe drawers oak",
    "phones": "iphone charger screen battery unlocked case",
    "tools": "drill hammer saw screwdriver bosch spanner",
}


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    topics = list(_TOPICS.values())
    return [" ".join(rng.choice(topics[i % 3].split(), 5)) + " good condition collection" for i in range(n)]


@pytest.fixture(scope="module")
def embedding() -> Word2VecEmbedding:
    return train_vectors(_texts(60), dim=16, window=3, negative=5, min_count=1, epochs=100, workers=1, progress=False)


def test_vocabulary_reserves_pad_and_unk_and_orders_tokens_by_frequency(embedding: Word2VecEmbedding) -> None:
    assert embedding.vocabulary[:2] == ["<pad>", "<unk>"]
    # "good condition collection" ends every text; stemmed and most frequent.
    assert set(embedding.vocabulary[2:5]) == {"good", "condit", "collect"}
    assert embedding.vectors.shape == (len(embedding.vocabulary), 16)
    assert not embedding.vectors[PAD_INDEX].any() and not embedding.vectors[UNK_INDEX].any()
    assert embedding.config["preprocessing"]["stemmer"] == "snowball"
    assert "the" in embedding.config["preprocessing"]["stop_words"]


def test_nearest_neighbours_follow_the_topics(embedding: Word2VecEmbedding) -> None:
    # Raw words are preprocessed like the training text ("Sofas" -> "sofa").
    neighbours = [token for token, _ in embedding.nearest("Sofas", k=4)]
    assert len(neighbours) == 4 and "sofa" not in neighbours
    furniture = set(TextPreprocessor().tokenize(_TOPICS["furniture"]))
    assert len(furniture.intersection(neighbours)) >= 3
    with pytest.raises(KeyError, match="not in the word2vec vocabulary"):
        embedding.nearest("zeppelin")


def test_encode_pads_truncates_and_maps_unknown_and_empty_texts(embedding: Word2VecEmbedding) -> None:
    ids = embedding.encode(["Sofa | in Leeds, West Yorkshire | Gumtree", "sofa zeppelin", "", "the and of",
                            "sofa " * 10], max_length=4)
    sofa = embedding.vocabulary.index("sofa")
    assert ids.dtype == np.int64 and ids.shape == (5, 4)
    assert ids[0].tolist() == [sofa, PAD_INDEX, PAD_INDEX, PAD_INDEX]  # the marketplace suffix is cleaned away
    assert ids[1].tolist() == [sofa, UNK_INDEX, PAD_INDEX, PAD_INDEX]
    assert ids[2].tolist() == ids[3].tolist() == [UNK_INDEX, PAD_INDEX, PAD_INDEX, PAD_INDEX]  # nothing left
    assert ids[4].tolist() == [sofa] * 4
    known = embedding.encoder.encode(["sofa zeppelin", "", "sofa " * 10], max_length=4).known
    assert known.tolist() == [1, 0, 10]  # counted before truncation


def test_encoder_rejects_a_vocabulary_without_reserved_tokens_and_non_text() -> None:
    with pytest.raises(CheckpointError, match="must start with"):
        TokenEncoder(["sofa", "<unk>"], TextPreprocessor().to_config())
    encoder = TokenEncoder(["<pad>", "<unk>", "sofa"], TextPreprocessor().to_config())
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("sofa", 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text 1 is int"):
        encoder.encode(["sofa", 3], 4)  # type: ignore[list-item]


def test_training_needs_tokens() -> None:
    with pytest.raises(ValueError, match="none of the 2 texts has a token"):
        train_vectors(["", "the of"], progress=False)
    with pytest.raises(ValueError, match="min_count=5"):
        train_vectors(["sofa chair"], min_count=5, progress=False)


def test_save_load_round_trip_without_pickle(embedding: Word2VecEmbedding, tmp_path: Path) -> None:
    folder = tmp_path / "w2v"
    embedding.data_summary = {"texts": 60}
    embedding.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = load_model(str(folder))
    assert isinstance(loaded, Word2VecEmbedding)
    np.testing.assert_array_equal(loaded.vectors, embedding.vectors)
    assert loaded.vocabulary == embedding.vocabulary
    assert loaded.config["dim"] == 16 and loaded.config["window"] == 3 and loaded.data_summary == {"texts": 60}
    assert loaded.nearest("sofa", 3) == embedding.nearest("sofa", 3)
    plot = plot_embedding_2d(loaded, tmp_path / "plot.png", n_words=20, method="pca")
    assert plot.stat().st_size > 1000


def test_probe_words_are_each_class_s_most_typical_token_not_the_shared_ones(embedding: Word2VecEmbedding) -> None:
    # "good condition collection" ends every text and is the most frequent; each class's own words win instead.
    texts = ["sofa chair good condition collection", "sofa table good condition", "oak sofa collection",
             "drill saw good condition", "drill hammer collection", "drill good condition"]
    labels = ["Home", "Home", "Home", "Tools", "Tools", "Tools"]
    assert probe_words(embedding, texts, labels) == ["sofa", "drill"]
    # Equal scores (drill and saw are each in 2 texts, all of the class): the more frequent token in the vocabulary.
    tied = probe_words(embedding, texts[3:5] + ["saw"], ["Tools"] * 3)
    assert tied == [min("drill", "saw", key=embedding.vocabulary.index)]
    assert probe_words(embedding, ["Drills! and zeppelins"], ["Tools"]) == ["drill"]  # preprocessed, known tokens only
    assert probe_words(embedding, ["zeppelin"], ["Tools"]) == []


def test_label_tokens_are_placed_every_interval_tokens_and_at_both_ends() -> None:
    assert _with_label_tokens(["a", "b", "c", "d", "e"], "Phones", 2) == [
        "<label Phones>", "a", "b", "<label Phones>", "c", "d", "<label Phones>", "e", "<label Phones>"]
    assert _with_label_tokens(["a", "b"], 0, 3) == ["<label 0>", "a", "b", "<label 0>"]


def _cosine(embedding: Word2VecEmbedding, a: str, b: str) -> float:
    u, v = (embedding.vectors[embedding.vocabulary.index(word)] for word in (a, b))
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_class_pseudo_words_bring_words_of_one_class_together() -> None:
    # Each text has one key word among fillers shared by all classes; key words never meet each other, so
    # plain word2vec sees the same contexts around all four. Class 0 owns alpha and bravo, class 1 delta and echo.
    rng = np.random.default_rng(0)
    fillers = "red blue green white black brown grey pink".split()
    keys = {"alpha": 0, "bravo": 0, "delta": 1, "echo": 1}
    texts, labels = [], []
    for i in range(400):
        key = list(keys)[i % 4]
        words = [*rng.choice(fillers, 6)]
        words.insert(int(rng.integers(0, 7)), key)
        texts.append(" ".join(words))
        labels.append(keys[key])
    options = dict(dim=16, window=2, negative=5, min_count=1, epochs=30, workers=1, progress=False)
    aware = train_vectors(texts, labels=labels, label_interval=2, **options)
    plain = train_vectors(texts, **options)

    def class_gap(embedding: Word2VecEmbedding) -> float:
        """Same-class minus other-class similarity of the key words."""
        same = (_cosine(embedding, "alpha", "bravo") + _cosine(embedding, "delta", "echo")) / 2
        other = np.mean([_cosine(embedding, a, b) for a in ("alpha", "bravo") for b in ("delta", "echo")])
        return float(same - other)

    assert class_gap(aware) > 0.3
    assert class_gap(aware) > class_gap(plain) + 0.2
    # The pseudo-words shape the vectors but are not words: the vocabulary and the record say so.
    assert not [token for token in aware.vocabulary if token.startswith("<label")]
    assert sorted(aware.vocabulary) == sorted(plain.vocabulary)
    assert aware.config["label_interval"] == 2 and plain.config["label_interval"] == 0
    assert aware.data_summary["tokens"] == plain.data_summary["tokens"] == 400 * 7


def test_labels_must_match_the_texts() -> None:
    with pytest.raises(ValueError, match="1 labels for 2 texts"):
        train_vectors(["sofa chair", "drill saw"], labels=["Home"], progress=False)
    with pytest.raises(ValueError, match="label_interval must be 0"):
        train_vectors(["sofa chair"], labels=["Home"], label_interval=-1, progress=False)


def _write_export(folder: Path, listings: list[tuple[str, str, str]]) -> dict[str, str]:
    """A tiny CSV export (no photos) imported into SQLite: (id, name + description, category) per product."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "products.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "id", "product_name", "category", "product_description", "price", "location"])
        for i, (product_id, text, category) in enumerate(listings):
            writer.writerow([i, product_id, f"{text.split()[0]} | in Leeds, West Yorkshire | Gumtree", category,
                             text, "£10.00", "Leeds, West Yorkshire"])
    (folder / "images.csv").write_text(",id,product_id,bucket_link,image_ref,create_time\n", encoding="utf-8")
    (folder / "images").mkdir(exist_ok=True)
    db_url = f"sqlite:///{folder / 'marketplace.db'}"
    import_csv(folder / "products.csv", folder / "images.csv", db_url, progress=False)
    return {"db_url": db_url, "images": str(folder / "images")}


def test_script_trains_on_the_training_split_only(tmp_path: Path) -> None:
    # Every listing carries a marker word of its own; markers of validation and test products must not
    # reach the vocabulary, while every training marker does (min_count 1).
    categories = ["Home & Garden / Sofas", "Phones / Mobiles", "DIY Tools & Materials / Drills"]
    texts = _texts(60, seed=1)
    listings = [(f"p{i:03d}", f"{text} marker{i:03d}x", categories[i % 3]) for i, text in enumerate(texts)]
    data = _write_export(tmp_path / "export", listings)
    output = tmp_path / "w2v"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train_word2vec.py"), "--db-url", data["db_url"], "--images",
         data["images"], "--output", str(output), "--dim", "8", "--epochs", "2", "--min-count", "1",
         "--plot-method", "pca", "--plot-words", "30", "--neighbours", "sofa", "zeppelin", "--seed", "3"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "sofa:" in completed.stdout and "'zeppelin' is not in the word2vec vocabulary" in completed.stdout
    assert (output / "embedding_2d.png").is_file()

    splits = load_marketplace(data["db_url"], data["images"]).split((0.8, 0.1, 0.1), seed=3)
    vocabulary = set(load_model(str(output)).vocabulary)  # type: ignore[attr-defined]
    markers = {name: {f"marker{product_id[1:]}x" for product_id in split.products["product_id"]}
               for name, split in splits.items()}
    assert len(markers["val"]) == len(markers["test"]) == 6
    assert markers["train"] <= vocabulary
    assert not (markers["val"] | markers["test"]) & vocabulary

    embedding = Word2VecEmbedding.from_pretrained(str(output))
    assert embedding.metrics["nearest_neighbours"]["sofa"]
    assert embedding.config["label_interval"] == 3  # the training classes were read, as pseudo-words only
    assert not [token for token in vocabulary if token.startswith("<label")]
    check_same_split(embedding, splits, "word2vec embedding")  # the same split passes
    other = load_marketplace(data["db_url"], data["images"]).split((0.8, 0.1, 0.1), seed=4)
    with pytest.raises(CheckpointError, match="different set of products"):
        check_same_split(embedding, other, "word2vec embedding")

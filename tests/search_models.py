"""Tiny embedding models for the similar-listing tests, made from the session's sample marketplace: a text CNN
trained for 15 short epochs on word2vec vectors of the sample's texts (about half of a listing's neighbours share its
category), an untrained tiny image classifier and their fusion, saved as checkpoints to be loaded by name."""

from __future__ import annotations

from pathlib import Path

import torch

from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.models import create_model
from marketplace_reco.models.fusion import FusionClassifier
from marketplace_reco.models.text_cnn import TextCNN
from marketplace_reco.training.text_cnn import TextCNNTrainConfig
from marketplace_reco.training.text_cnn import train as train_text_cnn
from marketplace_reco.training.word2vec import train_vectors

IMAGE_MODEL, TEXT_MODEL, FUSION_MODEL = "image-classifier", "text-cnn", "fusion"


def save_embedding_checkpoints(marketplace: Marketplace, folder: Path) -> Path:
    """``image-classifier``, ``text-cnn`` and ``fusion`` checkpoints in ``folder`` (a few seconds on one core)."""
    torch.manual_seed(0)
    splits = marketplace.split((0.8, 0.2, 0.0), seed=0)
    train = splits["train"].products
    vectors = train_vectors(train["text"].tolist(), labels=train["label"].tolist(), dim=16, window=3, negative=5,
                            min_count=1, epochs=5, workers=1, progress=False)
    text = TextCNN.from_word2vec(vectors, marketplace.classes, max_length=32, kernel_sizes=[1, 2], num_filters=16,
                                 feature_dim=16, ensemble_size=1, dropout=0.1, fine_tune_embedding=True)
    train_text_cnn(text, splits, TextCNNTrainConfig(epochs=15, batch_size=8, learning_rate=0.03, patience=15,
                                                    adversarial_epsilon=0.0))
    image = create_model(IMAGE_MODEL, classes=marketplace.classes, backbone="test_resnet",
                         preprocessing={"image_size": 32}, feature_dim=16)
    image.save_pretrained(folder / IMAGE_MODEL)
    text.save_pretrained(folder / TEXT_MODEL)
    FusionClassifier.from_branches(image, text).save_pretrained(folder / FUSION_MODEL)
    return folder

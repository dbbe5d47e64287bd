"""Fitting the models: one module per family (``train(model, splits, config, context) -> TrainResult``), the
torch loop they share, the run every training script goes through, held-out evaluation and benchmarks' helpers.

    >>> from marketplace_reco.training import text_cnn, evaluate_model
    >>> result = text_cnn.train(model, splits, text_cnn.TextCNNTrainConfig(epochs=10))
    >>> evaluate_model(model, splits["test"])["accuracy"]
"""

from . import fusion, hog_svm, image_classifier, text_cnn, text_transformer, word2vec
from .evaluation import evaluate_model
from .feature_cache import FeatureCache
from .runs import TrainResult, run_training

__all__ = ["FeatureCache", "TrainResult", "evaluate_model", "fusion", "hog_svm", "image_classifier", "run_training",
           "text_cnn", "text_transformer", "word2vec"]

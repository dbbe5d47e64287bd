"""Model families, registered by type name: create with ``create_model``, load any checkpoint with ``load_model``.

Inference only: architectures, the checkpoint format and hubs, ``predict_proba`` and features. Fitting a model
lives in ``marketplace_reco.training``.
"""

from ._checkpoint import CheckpointMixin, TorchCheckpointMixin
from ._format import CARD_FILE, CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_config
from ._hub import DEFAULT_REVISION, ResolvedCheckpoint, pull_checkpoint, push_checkpoint, resolve_checkpoint
from ._listings import ListingImages, mean_by_listing
from ._quantization import QUANTIZATIONS, check_quantization
from ._registry import create_model, list_models, load_model, register_model
from ._retrieval import DEFAULT_RETRIEVAL
from .errors import CheckpointError, CheckpointNotFoundError, HubError, ModelConfigError, UnknownModelTypeError
from .fusion import FusionClassifier
from .hog_svm import HogSvmClassifier
from .image_classifier import ImageClassifier, PretrainedWeightsError
from .text_cnn import TextCNN
from .text_transformer import TextTransformerClassifier
from .word2vec import Word2VecEmbedding

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "read_config",
    "DEFAULT_RETRIEVAL",
    "DEFAULT_REVISION",
    "FORMAT_VERSION",
    "QUANTIZATIONS",
    "CheckpointError",
    "CheckpointMixin",
    "CheckpointNotFoundError",
    "FusionClassifier",
    "HogSvmClassifier",
    "HubError",
    "ImageClassifier",
    "ListingImages",
    "ModelConfigError",
    "PretrainedWeightsError",
    "ResolvedCheckpoint",
    "TextCNN",
    "TextTransformerClassifier",
    "TorchCheckpointMixin",
    "UnknownModelTypeError",
    "Word2VecEmbedding",
    "check_quantization",
    "create_model",
    "list_models",
    "load_model",
    "mean_by_listing",
    "pull_checkpoint",
    "push_checkpoint",
    "register_model",
    "resolve_checkpoint",
]

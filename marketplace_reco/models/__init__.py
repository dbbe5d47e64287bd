"""Model families, registered by type name; create with ``create_model``, load with ``load_model``."""

from . import fusion, hog_svm, image_classifier, text_cnn, word2vec  # noqa: F401  (registers the model types)
from .checkpoint import CheckpointMixin, TorchCheckpointMixin
from .errors import CheckpointError, CheckpointNotFoundError, HubError, ModelConfigError, UnknownModelTypeError
from .registry import create_model, list_models, load_model, register_model

__all__ = [
    "CheckpointError",
    "CheckpointMixin",
    "CheckpointNotFoundError",
    "HubError",
    "ModelConfigError",
    "TorchCheckpointMixin",
    "UnknownModelTypeError",
    "create_model",
    "list_models",
    "load_model",
    "register_model",
]

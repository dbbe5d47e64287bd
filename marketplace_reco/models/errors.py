"""Errors raised while creating, saving, loading or moving checkpoints."""


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file and, where it applies, the key."""


class UnknownModelTypeError(CheckpointError):
    """``config.json`` or a caller names a model type that is not registered."""


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint exists under the given name, folder, bucket or repository."""


class HubError(CheckpointError):
    """A hub (local folder, S3 bucket, Hugging Face Hub) refused or failed a transfer."""


class ModelConfigError(CheckpointError, ValueError):
    """Invalid hyperparameters or training inputs for a model; the message names the parameter."""

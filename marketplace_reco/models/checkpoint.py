"""The checkpoint format shared by every model: ``config.json`` + ``model.safetensors`` + ``README.md``.

Built on ``huggingface_hub.ModelHubMixin``: the JSON-serialisable ``__init__`` arguments become
``config.json``. What the mixin leaves open is filled in here: arrays are always written with
safetensors (never pickle), each with its sha256 in the file's header; loading checks every key, shape
and checksum before touching the model; the config also records the model type, format version,
training metrics and data summary that the model card renders; and ``push_to_hub`` goes through
``hub.push_checkpoint`` so a model reaches a local folder, S3 or the Hugging Face Hub alike.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .errors import CheckpointError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)

# Keys written by the format itself rather than by a model's __init__ arguments.
_FORMAT_KEYS = ("model_type", "format_version", "metrics", "data_summary")
# safetensors header entry holding {array key: sha256 of its bytes}: catches corrupted data, which the
# format itself does not (only a damaged header or a truncated file fail to open).
_CHECKSUMS_METADATA = "sha256"
CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "model_card.md"


class CheckpointMixin(ModelHubMixin):
    """Mixin for every model of the project.

    Subclasses implement ``_state_arrays()`` (what goes into ``model.safetensors``) and
    ``_load_state_arrays(arrays)``; the arrays returned by a freshly constructed model define the
    keys and shapes a checkpoint must contain, which is what makes loading strict.
    """

    model_type: ClassVar[str] = ""
    #: What ``predict_proba`` consumes: "image", "text", "image+text", or "" for non-classifiers.
    input_kind: ClassVar[str] = ""
    #: One line for the model card.
    description: ClassVar[str] = ""

    metrics: dict[str, Any]
    data_summary: dict[str, Any]
    #: Where the model was loaded from: {"name", "revision", "folder"}; empty for a model built in memory.
    source: dict[str, str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(library_name="marketplace_reco", **kwargs)

    def __new__(cls, *args: Any, **kwargs: Any) -> CheckpointMixin:
        instance = super().__new__(cls, *args, **kwargs)
        instance.metrics = {}
        instance.data_summary = {}
        instance.source = {}
        return instance

    # ---- what subclasses provide -------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    # ---- config -------------------------------------------------------------------------------
    def _record_config(self, **values: Any) -> None:
        """Record init arguments as ``__init__`` resolved them (e.g. a ``None`` default filled in), so
        ``config.json`` states them explicitly and reloading does not depend on today's defaults."""
        self._hub_mixin_config = {**(getattr(self, "_hub_mixin_config", None) or {}), **values}

    @property
    def config(self) -> dict[str, Any]:
        """The full ``config.json`` content: format keys, init arguments, metrics and data summary."""
        init_args = dict(getattr(self, "_hub_mixin_config", None) or {})
        return {
            "model_type": self.model_type,
            "format_version": FORMAT_VERSION,
            **init_args,
            "metrics": self.metrics,
            "data_summary": self.data_summary,
        }

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path) -> Path:  # type: ignore[override]
        """Write ``config.json``, ``model.safetensors`` and a freshly rendered ``README.md``; return the folder."""
        folder = Path(save_directory)
        # The mixin never overwrites an existing card; a re-save must describe the new weights.
        (folder / CARD_FILE).unlink(missing_ok=True)
        super().save_pretrained(folder, config=self.config)
        return folder

    def _save_pretrained(self, save_directory: Path) -> None:
        # np.require keeps 0-d arrays (e.g. BatchNorm's num_batches_tracked) 0-d; ascontiguousarray would not.
        arrays = {key: np.require(value, requirements="C") for key, value in self._state_arrays().items()}
        checksums = {key: _array_sha256(value) for key, value in arrays.items()}
        save_file(arrays, str(save_directory / WEIGHTS_FILE),
                  metadata={"format": "np", _CHECKSUMS_METADATA: json.dumps(checksums, sort_keys=True)})

    def push_to_hub(self, target: str, revision: str | None = None) -> str:  # type: ignore[override]
        """Save to a temporary folder and push it to ``target`` (a local name or folder, ``s3://bucket/prefix/name``
        or a Hugging Face ``org/repo``); return the resolved revision. See ``hub.push_checkpoint``."""
        from .hub import push_checkpoint

        with tempfile.TemporaryDirectory(prefix="marketplace-reco-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "checkpoint")
            return push_checkpoint(folder, target, revision=revision)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        from .model_card import render_model_card

        return ModelCard(render_model_card(self, CARD_TEMPLATE))

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: Any,
        *,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> CheckpointMixin:
        """Load from a checkpoint name, folder, ``s3://`` location or Hugging Face repo id."""
        from .hub import ResolvedCheckpoint, resolve_checkpoint

        resolved = pretrained_model_name_or_path
        if not isinstance(resolved, ResolvedCheckpoint):
            resolved = resolve_checkpoint(str(pretrained_model_name_or_path), revision=revision)
        config = read_config(resolved.folder)
        if config["model_type"] != cls.model_type:
            raise CheckpointError(
                f"{resolved.folder / CONFIG_FILE}: model_type is {config['model_type']!r}, "
                f"but {cls.__name__} loads {cls.model_type!r} (use load_model() to dispatch on the type)"
            )
        config_path = resolved.folder / CONFIG_FILE
        init_kwargs = {key: value for key, value in config.items() if key not in _FORMAT_KEYS}
        parameters = {name: p for name, p in cls._hub_mixin_init_parameters.items() if name != "self"}
        unknown = sorted(set(init_kwargs) - set(parameters))
        if unknown:
            raise CheckpointError(f"{config_path}: unexpected keys {unknown} for model type {cls.model_type!r}")
        required = {name for name, p in parameters.items()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        missing = sorted(required - set(init_kwargs) - set(model_kwargs))
        if missing:
            raise CheckpointError(f"{config_path}: missing keys {missing} needed to build a {cls.model_type!r} model")
        try:
            model = cls(**{**init_kwargs, **model_kwargs})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: cannot build a {cls.model_type!r} model from it ({exc})") from exc
        model._load_checkpoint_arrays(resolved.folder / WEIGHTS_FILE)
        model.metrics = config.get("metrics") or {}
        model.data_summary = config.get("data_summary") or {}
        model.source = {"name": resolved.name, "revision": resolved.revision, "folder": str(resolved.folder)}
        return model

    def _load_checkpoint_arrays(self, weights_path: Path) -> None:
        try:
            with safe_open(str(weights_path), framework="np") as handle:
                metadata = handle.metadata() or {}
                arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        except FileNotFoundError:
            raise CheckpointError(f"{weights_path}: missing weights file") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
        expected = self._state_arrays()
        missing = sorted(set(expected) - set(arrays))
        unexpected = sorted(set(arrays) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{weights_path}: missing keys {missing}, unexpected keys {unexpected}")
        for key, value in expected.items():
            if arrays[key].shape != value.shape:
                raise CheckpointError(
                    f"{weights_path}: key {key!r} has shape {tuple(arrays[key].shape)}, "
                    f"the configuration expects {tuple(value.shape)}"
                )
        try:
            checksums = json.loads(metadata[_CHECKSUMS_METADATA])
        except (KeyError, ValueError):
            raise CheckpointError(
                f"{weights_path}: header has no valid {_CHECKSUMS_METADATA!r} entry (array checksums); "
                "it was not written by marketplace_reco's save_pretrained"
            ) from None
        for key, value in arrays.items():
            if checksums.get(key) != _array_sha256(value):
                raise CheckpointError(f"{weights_path}: key {key!r} does not match its sha256; the file is corrupted")
        self._load_state_arrays(arrays)


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def read_config(folder: Path) -> dict[str, Any]:
    """Read and validate a checkpoint's ``config.json`` (type present, format not newer than ours)."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {folder} is not a checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}: no 'model_type' key")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this marketplace_reco understands "
            f"({FORMAT_VERSION}); upgrade the package"
        )
    return config


def content_revision(folder: Path) -> str:
    """A short content hash of a checkpoint's weights and config: the revision of an unversioned folder."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            digest.update((folder / name).read_bytes())
        except OSError as exc:
            raise CheckpointError(f"{folder / name}: unreadable or missing ({exc.strerror})") from exc
    return digest.hexdigest()[:12]


class TorchCheckpointMixin(CheckpointMixin):
    """Checkpointing for ``torch.nn.Module`` models: the state dict travels as float arrays."""

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {key: value.detach().cpu().numpy() for key, value in self.state_dict().items()}  # type: ignore[attr-defined]

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        import torch

        self.load_state_dict({key: torch.from_numpy(value) for key, value in arrays.items()}, strict=True)  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]

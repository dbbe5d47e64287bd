"""The mixin every model shares: save to and load from a checkpoint folder (``_format``), strictly.

Built on ``huggingface_hub.ModelHubMixin`` through its extension points: the mixin records the JSON-serialisable
``__init__`` arguments, and its ``save_pretrained`` calls ``_save_pretrained`` (here: ``config.json`` with the
format's own keys around those arguments, any extra files, then ``model.safetensors`` with the sha256 of every
array and of those files in its header) and writes ``README.md`` from ``generate_model_card``. Loading ends in
``_from_pretrained``, which checks everything before the model is used: unknown or missing config keys, missing
or unexpected arrays, shapes, checksums (an edited ``config.json`` is refused, not silently obeyed), non-finite
weights; files that do not belong to the format are reported.

``from_pretrained`` and ``push_to_hub`` are this project's own, with their own signatures: the mixin's versions
only know local folders and Hugging Face repo ids, while a checkpoint here is also a bare name in the local
checkpoints folder or an ``s3://`` location (``_hub``), and is verified on arrival.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ._card import render_model_card
from ._format import (
    CARD_FILE,
    CONFIG_FILE,
    DOCUMENTATION_SUFFIXES,
    FORMAT_KEYS,
    FORMAT_VERSION,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    content_revision,
    file_sha256,
    read_config,
)
from ._hub import ResolvedCheckpoint, push_checkpoint, resolve_checkpoint
from ._quantization import check_quantization, quantize_linear_layers
from .errors import CheckpointError, ModelConfigError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound="CheckpointMixin")

# safetensors header entries: {array key: sha256 of its bytes} (the format itself only notices a damaged header
# or a truncated file) and {file name: sha256} for config.json and the model's extra files.
_ARRAY_CHECKSUMS = "sha256"
_FILE_CHECKSUMS = "files_sha256"


class CheckpointMixin(ModelHubMixin):
    """Mixin for every model of the project.

    Subclasses implement ``_state_arrays()`` (what goes into ``model.safetensors``) and
    ``_load_state_arrays(arrays)``; the arrays returned by a freshly constructed model define the
    keys and shapes a checkpoint must contain, which is what makes loading strict. A model that needs files
    besides its arrays (a tokenizer's) writes them in ``_save_extra_files`` and reads them in ``_load_extra_files``;
    their checksums join config.json's in the weights' header, and loading verifies them before they are read.
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
    #: The quantization applied since loading (``quantize``), None for the float weights.
    quantization: str | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(library_name="marketplace_reco", **kwargs)

    def __new__(cls, *args: Any, **kwargs: Any) -> CheckpointMixin:
        instance = super().__new__(cls, *args, **kwargs)
        instance.metrics = {}
        instance.data_summary = {}
        instance.source = {}
        instance.quantization = None
        return instance

    # ---- what subclasses provide -------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _save_extra_files(self, folder: Path) -> list[str]:
        """Write the files the model needs besides its arrays into ``folder``; their paths relative to it."""
        return []

    def _load_extra_files(self, folder: Path) -> None:
        """Read what ``_save_extra_files`` wrote, once loading has verified it against the weights' header."""

    # ---- config -------------------------------------------------------------------------------
    def _record_config(self, **values: Any) -> None:
        """Record init arguments as ``__init__`` resolved them (e.g. a ``None`` default filled in), so
        ``config.json`` states them explicitly and reloading does not depend on today's defaults."""
        self._hub_mixin_config = {**self._init_arguments(), **values}

    def _init_arguments(self) -> dict[str, Any]:
        # ModelHubMixin keeps the JSON-serialisable __init__ arguments here (what it would write as config.json).
        return dict(getattr(self, "_hub_mixin_config", None) or {})

    @property
    def config(self) -> dict[str, Any]:
        """The full ``config.json`` content: format keys, init arguments, metrics and data summary."""
        return {
            "model_type": self.model_type,
            "format_version": FORMAT_VERSION,
            **self._init_arguments(),
            "metrics": self.metrics,
            "data_summary": self.data_summary,
        }

    def init_arguments(self) -> dict[str, Any]:
        """The arguments that rebuild this model untrained (its config without the format's own keys)."""
        return {key: value for key, value in self.config.items() if key not in FORMAT_KEYS}

    # ---- inference ----------------------------------------------------------------------------
    def quantize(self, kind: str) -> None:
        """Quantize the layers where it makes inference faster without costing accuracy (``_int8_layers``; see
        ``_quantization``); a model with none (photo models, the text CNN, HOG-SVM) stays as it is and its
        ``quantization`` None."""
        check_quantization(kind)
        layers = self._int8_layers()
        if layers:
            quantize_linear_layers(self, kind, layers)  # type: ignore[arg-type]  # only torch models name layers
            self.quantization = kind

    def _int8_layers(self) -> list[str]:
        """Names of the linear layers int8 quantization pays for (a transformer's); none by default."""
        return []

    # ---- saving (ModelHubMixin.save_pretrained calls these) -------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        if self.quantization is not None:
            raise ModelConfigError(f"this {self.model_type} model is {self.quantization}-quantized for inference and "
                                   "cannot be saved: save the float model it was loaded from")
        # The mixin writes a card only where none exists; a re-save must describe the new weights.
        (save_directory / CARD_FILE).unlink(missing_ok=True)
        config = json.dumps(self.config, sort_keys=True, indent=2).encode("utf-8")
        (save_directory / CONFIG_FILE).write_bytes(config)
        extra_files = self._save_extra_files(save_directory)
        files = {CONFIG_FILE: hashlib.sha256(config).hexdigest(),
                 **{name: file_sha256(save_directory / name) for name in extra_files}}
        # np.require keeps 0-d arrays (e.g. BatchNorm's num_batches_tracked) 0-d; ascontiguousarray would not.
        arrays = {key: np.require(value, requirements="C") for key, value in self._state_arrays().items()}
        checksums = {key: _array_sha256(value) for key, value in arrays.items()}
        save_file(arrays, str(save_directory / WEIGHTS_FILE),
                  metadata={"format": "np", _ARRAY_CHECKSUMS: json.dumps(checksums, sort_keys=True),
                            _FILE_CHECKSUMS: json.dumps(files, sort_keys=True)})

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return ModelCard(render_model_card(self))

    def push_to_hub(self, target: str, *, revision: str | None = None) -> str:  # type: ignore[override]
        """Save to a temporary folder and push it to ``target`` (a local name or folder, ``s3://bucket/prefix/name``
        or a Hugging Face ``org/repo``); return the resolved revision (see ``_hub.push_checkpoint``)."""
        with tempfile.TemporaryDirectory(prefix="marketplace-reco-push-") as tmp:
            folder = Path(tmp) / "checkpoint"
            self.save_pretrained(folder)
            return push_checkpoint(folder, target, revision=revision)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls: type[M], name_or_path: str | Path, *,  # type: ignore[override]
                        revision: str | None = None, **model_kwargs: Any) -> M:
        """Load from a checkpoint name, folder, ``s3://`` location or Hugging Face repo id (``_hub``)."""
        resolved = resolve_checkpoint(str(name_or_path), revision=revision)
        config, config_sha256 = read_config(resolved.folder)
        if config["model_type"] != cls.model_type:
            raise CheckpointError(
                f"{resolved.folder / CONFIG_FILE}: model_type is {config['model_type']!r}, "
                f"but {cls.__name__} loads {cls.model_type!r} (use load_model() to dispatch on the type)"
            )
        return cls.from_resolved(resolved, config, config_sha256, **model_kwargs)

    @classmethod
    def from_resolved(cls: type[M], resolved: ResolvedCheckpoint, config: dict[str, Any], config_sha256: str,
                      **model_kwargs: Any) -> M:
        """Load a checkpoint already made local (``_hub.resolve_checkpoint``) whose config.json was read."""
        return cls._from_pretrained(model_id=str(resolved.folder), revision=resolved.revision, cache_dir=None,
                                    force_download=False, local_files_only=True, token=None, config=config,
                                    config_sha256=config_sha256, name=resolved.name, **model_kwargs)

    @classmethod
    def _from_pretrained(cls: type[M], *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict[str, Any] | None = None, config_sha256: str | None = None,
                         name: str | None = None, **model_kwargs: Any) -> M:
        """Build the model from the checkpoint folder ``model_id`` (already local) and load its arrays strictly.

        ``config``/``config_sha256`` are the folder's parsed ``config.json`` when the caller already read it.
        """
        folder = Path(model_id)
        if config is None or config_sha256 is None:
            config, config_sha256 = read_config(folder)
        model = cls._build(folder / CONFIG_FILE, config, model_kwargs)
        files = model._load_checkpoint_arrays(folder, config_sha256, int(config["format_version"]))
        model._load_extra_files(folder)
        _report_foreign_files(folder, files)
        model.metrics = config.get("metrics") or {}
        model.data_summary = config.get("data_summary") or {}
        model.source = {"name": name or model_id, "revision": revision or content_revision(folder),
                        "folder": str(folder)}
        return model

    @classmethod
    def _build(cls: type[M], config_path: Path, config: dict[str, Any], model_kwargs: dict[str, Any]) -> M:
        """A fresh model from the config's init arguments, refusing unknown and missing keys."""
        init_kwargs = {key: value for key, value in config.items() if key not in FORMAT_KEYS}
        parameters = {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
        unknown = sorted(set(init_kwargs) - set(parameters))
        if unknown:
            raise CheckpointError(f"{config_path}: unexpected keys {unknown} for model type {cls.model_type!r}")
        required = {name for name, p in parameters.items()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        missing = sorted(required - set(init_kwargs) - set(model_kwargs))
        if missing:
            raise CheckpointError(f"{config_path}: missing keys {missing} needed to build a {cls.model_type!r} model")
        try:
            return cls(**{**init_kwargs, **model_kwargs})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: cannot build a {cls.model_type!r} model from it ({exc})") from exc

    def _load_checkpoint_arrays(self, folder: Path, config_sha256: str, format_version: int) -> set[str]:
        """Verify the weights and the files their header vouches for, load the arrays; the verified files' names."""
        weights_path = folder / WEIGHTS_FILE
        try:
            with safe_open(str(weights_path), framework="np") as handle:
                metadata = handle.metadata() or {}
                arrays = {key: handle.get_tensor(key) for key in handle.keys()}
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
        checksums = _header_json(metadata, _ARRAY_CHECKSUMS, weights_path)
        for key, value in arrays.items():
            if checksums.get(key) != _array_sha256(value):
                raise CheckpointError(f"{weights_path}: key {key!r} does not match its sha256; the file is corrupted")
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise CheckpointError(f"{weights_path}: key {key!r} holds {int((~np.isfinite(value)).sum())} "
                                      "non-finite value(s) (NaN or infinity); the model cannot predict with it")
        files = {CONFIG_FILE}
        if format_version >= 2:
            files = _check_files(folder, _header_json(metadata, _FILE_CHECKSUMS, weights_path), config_sha256)
        else:
            logger.warning("%s: format version %d records no checksum of %s, so edits to it cannot be detected; "
                           "save the model again to protect it", folder, format_version, CONFIG_FILE)
        self._load_state_arrays(arrays)
        return files


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _header_json(metadata: dict[str, str], key: str, weights_path: Path) -> dict[str, str]:
    try:
        value = json.loads(metadata[key])
    except (KeyError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise CheckpointError(f"{weights_path}: header has no valid {key!r} entry (checksums); it was not written "
                              "by marketplace_reco's save_pretrained")
    return value


def _check_files(folder: Path, recorded: dict[str, str], config_sha256: str) -> set[str]:
    """Every file the weights' header vouches for must be there, unchanged (config.json was hashed on reading)."""
    for name, expected in {CONFIG_FILE: recorded.get(CONFIG_FILE), **recorded}.items():
        path = folder / name
        if name == CONFIG_FILE:
            actual = config_sha256
        elif not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint needs it")
        else:
            actual = file_sha256(path)
        if expected != actual:
            raise CheckpointError(
                f"{path}: does not match the sha256 recorded in {WEIGHTS_FILE} when the checkpoint was "
                "saved; it was edited or damaged since, so the model would not be the one that was trained "
                "(save the model again to change its configuration)"
            )
    return set(recorded) | {CONFIG_FILE}


def _report_foreign_files(folder: Path, verified: set[str]) -> None:
    """Log the files a checkpoint folder holds that the format neither reads nor documents: never loaded."""
    expected = {WEIGHTS_FILE, CARD_FILE, *verified}
    foreign = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                     if path.is_file() and not path.name.startswith(".")
                     and path.relative_to(folder).as_posix() not in expected)
    pickles = [name for name in foreign if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        logger.warning("%s holds %s: pickle-type file(s) are never loaded (they can run code); the model comes from "
                       "%s alone. Delete them if you did not put them there", folder, ", ".join(pickles), WEIGHTS_FILE)
    unknown = [name for name in foreign if name not in pickles and not name.lower().endswith(DOCUMENTATION_SUFFIXES)]
    if unknown:
        logger.warning("%s holds file(s) that are not part of the checkpoint format and are ignored: %s",
                       folder, ", ".join(unknown))


class TorchCheckpointMixin(CheckpointMixin):
    """Checkpointing for ``torch.nn.Module`` models: the state dict travels as float arrays."""

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {key: value.detach().cpu().numpy() for key, value in self.state_dict().items()}  # type: ignore[attr-defined]

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_state_dict({key: torch.from_numpy(value) for key, value in arrays.items()}, strict=True)  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]

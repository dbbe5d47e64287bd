"""Transfer learning on a timm backbone: a frozen trunk, its trainable last blocks, a feature layer and a head.

The backbone is any timm model name, ``resnet50`` by default, with or without a pretrained tag
(``tf_efficientnet_lite0.in1k``); ``pretrained=True`` loads its weights through timm's ordinary path (the
``timm/<name>`` repository of the Hugging Face Hub, honouring ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE``). It is traced with ``torch.fx`` and split into two graphs that share its modules:
- ``frozen_trunk(x)``: every operation that does not depend on a trainable parameter, run in inference mode
  and channels-last. Its outputs are exactly the values the trainable part reads, e.g. for ResNet-50 with one
  trainable block (``layer4.2``) that block's input.
- ``trainable_tail(*trunk_outputs)``: the rest, up to the pooled backbone features.
Because the frozen outputs depend only on the photo and the frozen weights, a trainer can compute them once
per photo and cache them (``training.image_classifier``), which is what makes epochs after the first cheap.

Which part trains is ``trainable_blocks``: the number of trailing blocks of the backbone, as timm itself groups
them (``backbone_blocks``: the stem, then ``layer1.0`` ... ``layer4.2`` for a ResNet-50, ``blocks.0.0`` ...
``blocks.6.0`` with ``conv_head`` + ``bn2`` for an EfficientNet), ``0`` for a frozen backbone (only the feature
layer and head train), or ``"all"``. Checkpoints saved before blocks were the unit record ``trainable_layers``
(trailing parameterised layers); ``upgrade_config`` maps them to the fewest whole blocks holding those layers,
which leaves their predictions unchanged (the split decides what may train, not what the network computes).

Similar-listing search: ``embed`` gives a listing's photos' ``photo_vectors`` averaged and normalised. With
``retrieval`` (``_retrieval``: several backbone stages and a colour histogram, whitened for matching photos of one
listing, fitted by the trainer) they are made to find a photo's listing; without it they are the pooled backbone
output.

Predictions: ``predict_proba`` is the softmax of the logits divided by ``temperature`` (fitted on validation
data by the trainer, so that probabilities mean what they say); with ``flip_averaging`` the logits are the mean
of the photo's and its mirror image's. Preprocessing (image size, letterbox fill, mean/std from timm's data
config) is part of the configuration too, so a loaded checkpoint predicts exactly as in training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, group_parameters
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torch import fx, nn

from ..data.images import letterbox
from ._calibration import TemperatureMixin, checked_temperature
from ._checkpoint import TorchCheckpointMixin
from ._format import read_config
from ._listings import ListingImages, listing_photo_embeddings
from ._registry import register_model
from ._retrieval import RetrievalDescriptor, checked_retrieval
from .errors import CheckpointError, ModelConfigError

#: Default ``trainable_blocks``: the backbone's last block (ResNet-50's ``layer4.2``).
DEFAULT_TRAINABLE_BLOCKS = 1
#: Photos per forward pass in ``predict_proba`` / ``extract_features``.
INFERENCE_BATCH_SIZE = 32
_PREPROCESSING_KEYS = ("image_size", "letterbox_fill", "mean", "std")
#: The views of a photo whose logits a prediction averages (``flip_averaging``: both), by name; each maps a batch
#: [n, 3, h, w] (pixels or normalised) to the same batch seen that way.
PREDICTION_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "plain": lambda x: x,
    "mirror": lambda x: x.flip(-1),
}

# True while a checkpoint is being loaded: its weights replace the trunk's, so nothing is downloaded.
_LOADING_CHECKPOINT: ContextVar[bool] = ContextVar("_LOADING_CHECKPOINT", default=False)


class PretrainedWeightsError(CheckpointError):
    """Pretrained backbone weights cannot be fetched or a local weights file does not fit the backbone."""


class _TimmTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps timm's untraceable modules and functions as opaque calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def _create_backbone(name: str, pretrained: bool | str) -> nn.Module:
    """The timm model ``name`` without its classifier (pooled features out), initialised as ``pretrained`` says."""
    if not timm.is_model(name):
        raise ModelConfigError(f"unknown timm backbone {name!r}; see timm.list_models() for the names "
                               "(e.g. 'resnet50', or 'tf_efficientnet_lite0.in1k' with a pretrained tag)")
    try:
        get_pretrained_cfg(name)
    except RuntimeError:
        architecture = name.partition(".")[0]
        raise ModelConfigError(f"backbone {name!r}: {architecture!r} has no such pretrained tag; its tags: "
                               f"{timm.list_pretrained(architecture + '.*')}") from None
    download = pretrained is True and not _LOADING_CHECKPOINT.get()
    try:
        backbone = timm.create_model(name, pretrained=download, num_classes=0)
    except (OSError, RuntimeError, ValueError) as exc:
        raise PretrainedWeightsError(
            f"cannot fetch pretrained weights for backbone {name!r} ({type(exc).__name__}: {exc}). "
            "Train from scratch with --no-pretrained, or pass a local weights file with --weights FILE "
            "(a timm or torchvision state dict saved as safetensors)"
        ) from exc
    if isinstance(pretrained, str) and not _LOADING_CHECKPOINT.get():
        _load_local_weights(backbone, Path(pretrained), name)
    return backbone


def _load_local_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a timm/torchvision state dict from a safetensors file, strictly, ignoring only its classifier."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise PretrainedWeightsError(f"weights file {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise PretrainedWeightsError(f"weights file {path} is not a readable safetensors file ({exc})") from exc
    classifier = backbone.pretrained_cfg.get("classifier") or ""
    # The backbone is built without a classifier, so the file's classification layer has nowhere to go.
    state = {key: value for key, value in state.items() if not (classifier and key.startswith(classifier + "."))}
    expected = backbone.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"weights file {path} does not fit backbone {name!r}: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise PretrainedWeightsError(f"weights file {path} does not fit backbone {name!r}: {exc}") from exc


def backbone_blocks(backbone: nn.Module) -> list[list[str]]:
    """The backbone's blocks in forward order, each as the names of the modules that own its parameters.

    The blocks are timm's own (``group_matcher(coarse=False)``, as for layer-wise learning-rate decay): the stem,
    then one entry per block, with what follows the last block (e.g. EfficientNet's ``conv_head`` + ``bn2``)
    merged into it. A parameter owned by the model itself (a ViT's ``cls_token``) counts under the name ``""``.
    """
    try:
        matcher = backbone.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        raise ModelConfigError(f"backbone {type(backbone).__name__} does not tell timm its blocks (no group_matcher); "
                               "use trainable_blocks 0 or 'all' with it") from None
    groups = group_parameters(backbone, matcher)
    return [list(dict.fromkeys(name.rpartition(".")[0] for name in groups[index])) for index in sorted(groups)]


def _select_trainable(backbone: nn.Module, name: str, trainable_blocks: int | str) -> list[str]:
    """Names of the modules that own the parameters of the last ``trainable_blocks`` blocks (all: every one)."""
    if trainable_blocks == "all":
        return list(dict.fromkeys(parameter.rpartition(".")[0] for parameter, _ in backbone.named_parameters()))
    if trainable_blocks == 0 and not isinstance(trainable_blocks, bool):
        return []
    blocks = backbone_blocks(backbone)
    valid = isinstance(trainable_blocks, int) and not isinstance(trainable_blocks, bool)
    if not valid or not 0 <= trainable_blocks <= len(blocks):  # type: ignore[operator]
        raise ModelConfigError(
            f"trainable_blocks must be 'all' or an integer from 0 to {len(blocks)} (the blocks of {name!r}, stem "
            f"included), not {trainable_blocks!r}"
        )
    return [module for block in blocks[len(blocks) - trainable_blocks:] for module in block]  # type: ignore[operator]


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """An image classifier's config as this version reads it: ``trainable_layers`` (the trailing parameterised
    layers, before whole blocks were the unit) becomes ``trainable_blocks``, the fewest trailing blocks that hold
    those layers. Predictions do not change (frozen trunk + tail is the same network); a fusion model that
    unfreezes the image branch would train the rest of that block too."""
    if "trainable_layers" not in config:
        return config
    upgraded = dict(config)
    layers = upgraded.pop("trainable_layers")
    if layers in ("all", 0):
        upgraded["trainable_blocks"] = layers
        return upgraded
    with torch.device("meta"):  # the names are all that is needed: no memory, no weights
        backbone = timm.create_model(upgraded.get("backbone", "resnet50"), num_classes=0)
    parameterised = [name for name, module in backbone.named_modules()
                     if next(module.parameters(recurse=False), None) is not None]
    trainable = set(parameterised[len(parameterised) - int(layers):])
    blocks = backbone_blocks(backbone)
    first = next(index for index, block in enumerate(blocks) if trainable & set(block))
    upgraded["trainable_blocks"] = len(blocks) - first
    return upgraded


def _resolve_preprocessing(backbone: nn.Module, preprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """The backbone's timm data config (input size, mean, std) overridden by the keys the caller gives."""
    given = dict(preprocessing or {})
    unknown = sorted(set(given) - set(_PREPROCESSING_KEYS))
    if unknown:
        raise ModelConfigError(f"preprocessing: unknown keys {unknown}; allowed: {list(_PREPROCESSING_KEYS)}")
    data_config = resolve_data_config({}, model=backbone)
    resolved = {
        "image_size": int(given.get("image_size", data_config["input_size"][-1])),
        "letterbox_fill": [int(v) for v in given.get("letterbox_fill", (0, 0, 0))],
        "mean": [float(v) for v in given.get("mean", data_config["mean"])],
        "std": [float(v) for v in given.get("std", data_config["std"])],
    }
    if resolved["image_size"] < 16:
        raise ModelConfigError(f"preprocessing: image_size must be at least 16 pixels, not {resolved['image_size']}")
    if len(resolved["letterbox_fill"]) != 3 or len(resolved["mean"]) != 3 or len(resolved["std"]) != 3:
        raise ModelConfigError("preprocessing: letterbox_fill, mean and std need three values (R, G, B)")
    return resolved


def _owns(module_names: Sequence[str], target: str) -> bool:
    """Whether the module/attribute path ``target`` lies inside (or contains) one of ``module_names``."""
    return any(target == m or target.startswith(m + ".") or m.startswith(target + ".") or m == "" for m in module_names)


def _trace(backbone: nn.Module) -> fx.Graph:
    """The backbone's forward as an fx graph, optional arguments (masks, flags) fixed at their defaults."""
    parameters = list(inspect.signature(backbone.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    was_training = backbone.training
    graph = _TimmTracer().trace(backbone.eval(), concrete_args=concrete or None)
    backbone.train(was_training)
    return graph


def _split_graph(graph: fx.Graph, trainable: Sequence[str]) -> tuple[fx.Graph, fx.Graph, list[str]]:
    """Split a traced backbone into the frozen graph (x -> boundary tuple) and the tail (boundary -> output).

    A node is in the tail when it reads a trainable module or parameter, directly or through its inputs.
    The boundary is every photo-dependent frozen value the tail reads; parameters and constants that do not
    depend on the photo are re-read in the tail instead of being passed (and cached) per photo.
    """
    nodes = list(graph.nodes)
    placeholder = nodes[0]
    output = nodes[-1]
    tail: set[fx.Node] = set()
    photo_dependent: set[fx.Node] = {placeholder}
    for node in nodes[1:-1]:
        reads_trainable = node.op in ("call_module", "get_attr") and _owns(trainable, str(node.target))
        if reads_trainable or any(arg in tail for arg in node.all_input_nodes):
            tail.add(node)
        if any(arg in photo_dependent for arg in node.all_input_nodes):
            photo_dependent.add(node)
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise ModelConfigError("the backbone must return a single tensor of pooled features")
    boundary = [
        node for node in nodes[:-1]
        if node not in tail and node in photo_dependent and (node is result or any(user in tail for user in node.users))
    ]

    needed = {placeholder}
    pending = list(boundary)
    while pending:  # only what the boundary needs: the frozen graph must not run the tail's parameters
        node = pending.pop()
        if node not in needed:
            needed.add(node)
            pending.extend(node.all_input_nodes)
    frozen_graph = fx.Graph()
    frozen_env: dict[fx.Node, fx.Node] = {}
    for node in nodes[:-1]:
        if node in needed:
            frozen_env[node] = frozen_graph.node_copy(node, lambda n: frozen_env[n])
    frozen_graph.output(tuple(frozen_env[node] for node in boundary))

    tail_graph = fx.Graph()
    tail_env: dict[fx.Node, fx.Node] = {node: tail_graph.placeholder(f"trunk_{i}") for i, node in enumerate(boundary)}

    def _in_tail(node: fx.Node) -> fx.Node:
        if node not in tail_env:  # a photo-independent frozen value (parameter, constant): recompute it here
            tail_env[node] = tail_graph.node_copy(node, _in_tail)
        return tail_env[node]

    for node in nodes[1:-1]:
        if node in tail:
            tail_env[node] = tail_graph.node_copy(node, _in_tail)
    tail_graph.output(_in_tail(result))
    return frozen_graph, tail_graph, [node.name for node in boundary]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


@register_model("image-classifier")
class ImageClassifier(nn.Module, TemperatureMixin, TorchCheckpointMixin):
    """timm backbone with a frozen trunk and trainable last blocks, a feature layer and a classification head.

    ``pretrained``: ``True`` fetches timm's pretrained weights for ``backbone`` (a name with a pretrained tag
    picks those weights), a string is a local safetensors state dict, ``False`` starts from random weights. It
    only matters when a model is created: loading a checkpoint never downloads anything, the trunk's weights are
    in the checkpoint. ``temperature`` divides the logits in ``predict_proba`` (1: as trained; the trainer fits it
    on validation data); ``flip_averaging`` averages the logits of each photo and its mirror image.
    ``retrieval`` (``None``, or settings of ``_retrieval.DEFAULT_RETRIEVAL``, missing keys taking their defaults)
    adds the similar-listing descriptor whose whitening the trainer fits.
    """

    input_kind = "image"
    description = ("Photo classifier: a timm backbone (transfer learning, last blocks trainable) with a feature "
                   "layer and a linear head; photos are letterboxed and normalised as recorded in the config, "
                   "probabilities calibrated by a temperature fitted on validation photos. With a retrieval "
                   "descriptor, listing vectors for similar-listing search from several backbone stages and the "
                   "photo's colours, whitened on pairs of photos of the training listings.")

    def __init__(
        self,
        classes: list[str],
        backbone: str = "resnet50",
        trainable_blocks: int | str = DEFAULT_TRAINABLE_BLOCKS,
        feature_dim: int = 256,
        dropout: float = 0.2,
        preprocessing: dict[str, Any] | None = None,
        flip_averaging: bool = False,
        temperature: float = 1.0,
        pretrained: bool | str = False,
        retrieval: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(classes) < 2:
            raise ModelConfigError(f"an image classifier needs at least 2 classes, got {list(classes)}")
        self.classes = list(classes)
        self.backbone_name = backbone
        self.temperature = checked_temperature(temperature)
        #: The views of a photo whose logits ``predict_proba`` averages (names of ``PREDICTION_VIEWS``).
        self.prediction_views = ["plain", "mirror"] if flip_averaging else ["plain"]
        self.backbone = _create_backbone(backbone, pretrained)
        self.preprocessing = _resolve_preprocessing(self.backbone, preprocessing)
        #: The similar-listing descriptor (``_retrieval``), or None: ``embed`` then averages pooled outputs.
        self.retrieval: RetrievalDescriptor | None = None
        if retrieval is not None:
            retrieval = checked_retrieval(retrieval)
            widths = RetrievalDescriptor.backbone_widths(self.backbone, retrieval["stages"],
                                                         self.preprocessing["image_size"])
            self.retrieval = RetrievalDescriptor(widths, **retrieval)
        self._record_config(preprocessing=self.preprocessing, retrieval=retrieval)
        #: The backbone modules whose parameters train (those of its last ``trainable_blocks`` blocks).
        self.trainable_module_names = _select_trainable(self.backbone, backbone, trainable_blocks)
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad_(self._is_trainable(name))
        # Pooled width: larger than num_features where a conv head follows the pooling (MobileNetV3).
        pooled_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.feature = nn.Sequential(nn.Linear(pooled_dim, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, len(self.classes)))
        self.backbone.to(memory_format=torch.channels_last)
        self._frozen_graph_def, self._tail_graph_def, self.trunk_output_names = _split_graph(
            _trace(self.backbone), self.trainable_module_names)
        self._build_graph_modules()
        self.train()  # applies the rule that frozen layers always run as at inference

    # ---- the split backbone ------------------------------------------------------------------------
    def _is_trainable(self, tensor_name: str) -> bool:
        """Whether a backbone parameter or buffer (``layer4.2.bn3.weight``) belongs to a trainable module."""
        return tensor_name.rpartition(".")[0] in self.trainable_module_names

    def _build_graph_modules(self) -> None:
        # Stored outside nn.Module's registry: they share the backbone's modules, so registering them would
        # duplicate every weight in state_dict().
        self.__dict__["_frozen_graph"] = fx.GraphModule(self.backbone, self._frozen_graph_def)
        self.__dict__["_tail_graph"] = fx.GraphModule(self.backbone, self._tail_graph_def)
        self.__dict__["_frozen_modules"] = [
            self.backbone.get_submodule(str(node.target))
            for node in self._frozen_graph_def.nodes if node.op == "call_module"
        ]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> ImageClassifier:  # type: ignore[override]
        # .to()/.cuda() may replace buffers; the graph modules must point at the moved ones.
        result = super()._apply(fn, recurse)
        self._build_graph_modules()
        return result

    def train(self, mode: bool = True) -> ImageClassifier:
        """Train mode for the trainable part only: frozen norms and dropouts always behave as at inference."""
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def frozen_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen part's outputs for normalised photos ``x`` [n, 3, h, w]: what a feature cache stores."""
        with torch.inference_mode():
            outputs = self._frozen_graph(_channels_last(x))
        if torch.is_grad_enabled():
            # Inference tensors cannot be saved for backward; the tail needs them to train.
            outputs = tuple(t.clone() for t in outputs)
        return tuple(outputs)

    def trainable_tail(self, *trunk_outputs: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [n, pooled width] from the frozen part's outputs."""
        return self._tail_graph(*(_channels_last(t) for t in trunk_outputs))

    def features_from_trunk(self, *trunk_outputs: torch.Tensor) -> torch.Tensor:
        """The feature layer's output [n, feature_dim] from the frozen part's outputs (cached or fresh)."""
        return self.feature(self.trainable_tail(*trunk_outputs))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature vectors [n, feature_dim] of normalised photos: what fusion concatenates."""
        return self.features_from_trunk(*self.frozen_trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [n, n_classes] of normalised photos ``x`` [n, 3, h, w]."""
        return self.head(self.features(x))

    def prediction_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits whose softmax ``predict_proba`` gives: the mean over ``prediction_views`` of normalised photos
        ``x``, divided by ``temperature``."""
        logits = torch.stack([self(PREDICTION_VIEWS[view](x)) for view in self.prediction_views]).mean(dim=0)
        return logits / self.temperature

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone tensors of the frozen part: with the preprocessing, all that ``frozen_trunk`` depends on."""
        return {name: value for name, value in self.backbone.state_dict().items() if not self._is_trainable(name)}

    # ---- photos in ------------------------------------------------------------------------------------
    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Letterboxed uint8 pixels [n, 3, size, size] as configured (``data.images.letterbox``)."""
        size = self.preprocessing["image_size"]
        fill = tuple(self.preprocessing["letterbox_fill"])
        arrays = [np.asarray(letterbox(image, size, fill)) for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [n, 3, h, w] (uint8, or float in [0, 1]) -> the input the backbone expects (config mean/std)."""
        mean = torch.tensor(self.preprocessing["mean"], device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing["std"], device=pixels.device).view(1, 3, 1, 1)
        unit = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        return (unit - mean) / std

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Photos -> normalised float tensor [n, 3, size, size], exactly as in training."""
        return self.normalize(self.to_pixels(images))

    def _batched(self, images: Sequence[Image.Image], compute: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """``compute(pixels)`` over uint8 letterboxed pixels (``to_pixels``) of ``images``, batch by batch, in
        inference mode, as float32 rows."""
        if images is None or len(images) == 0:
            raise ModelConfigError(f"{type(self).__name__} needs at least one image")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                chunks = [compute(self.to_pixels(images[start:start + INFERENCE_BATCH_SIZE]).to(device)).float().cpu()
                          for start in range(0, len(images), INFERENCE_BATCH_SIZE)]
        finally:
            self.train(was_training)
        return torch.cat(chunks).numpy()

    def extract_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Feature vectors [n, feature_dim] of PIL photos (the input of a fusion head)."""
        return self._batched(images, lambda pixels: self.features(self.normalize(pixels)))

    def retrieval_descriptors(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Raw similar-listing descriptors [n, input width] of PIL photos, before the whitening: what the trainer
        fits it on."""
        retrieval = self._checked_retrieval(fitted=False)
        return self._batched(images, lambda pixels: retrieval.describe(self.backbone, self.normalize(pixels), pixels))

    def photo_vectors(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[n, embedding_dim] vectors of PIL photos, what ``embed`` averages per listing: the whitened retrieval
        descriptor with ``retrieval``, the backbone's pooled output (before the feature layer) without."""
        if self.retrieval is None:
            return self._batched(images, lambda pixels: self.trainable_tail(*self.frozen_trunk(self.normalize(pixels))))
        retrieval = self._checked_retrieval(fitted=True)
        return self._batched(images, lambda pixels: retrieval(
            retrieval.describe(self.backbone, self.normalize(pixels), pixels)))

    def _checked_retrieval(self, *, fitted: bool) -> RetrievalDescriptor:
        if self.retrieval is None:
            raise ModelConfigError("this image classifier has no retrieval descriptor (created with retrieval=None)")
        if fitted and not bool(self.retrieval.projection.any()):
            raise ModelConfigError("the retrieval whitening is not fitted yet: train the model "
                                   "(training.image_classifier.train fits it on the training listings' photo pairs)")
        return self.retrieval

    @property
    def embedding_dim(self) -> int:
        """Width of ``embed``'s vectors: the retrieval descriptor's, or the backbone's pooled output."""
        return self.retrieval.dim if self.retrieval is not None else self.feature[0].in_features

    def embed(self, images: Sequence[ListingImages] | None = None, texts: Sequence[str] | None = None) -> np.ndarray:
        """[n_listings, embedding_dim] unit vectors of listings for similarity search: ``images[i]`` is a listing's
        photo or list of photos, whose ``photo_vectors`` (preprocessed as for prediction, without flip averaging)
        are averaged, then L2-normalised. ``texts`` is ignored (an image-only model).

        Not the feature layer: trained to separate 13 categories, it forgets what tells two sofas apart
        (same-listing recall@10 among the real listings' photos in reports/bench_search_retrieval.md)."""
        return listing_photo_embeddings(images if images is not None else [], self.photo_vectors,
                                        type(self).__name__)

    def predict_proba(self, images: Sequence[Image.Image] | None = None,
                      texts: Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities [n, n_classes] of PIL photos (calibrated, flip-averaged if configured); ``texts`` is
        ignored (an image-only model)."""
        return self._batched(images, lambda pixels: torch.softmax(self.prediction_logits(self.normalize(pixels)),
                                                                  dim=1))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config: dict[str, Any] | None = None,  # type: ignore[override]
                         config_sha256: str | None = None, **kwargs: Any) -> ImageClassifier:
        """Load a checkpoint (an older config upgraded, ``upgrade_config``); the trunk comes from its weights
        file, so nothing is downloaded."""
        if config is None or config_sha256 is None:
            config, config_sha256 = read_config(Path(model_id))
        token = _LOADING_CHECKPOINT.set(True)
        try:
            return super()._from_pretrained(model_id=model_id, config=upgrade_config(config),  # type: ignore[return-value]
                                            config_sha256=config_sha256, **kwargs)
        finally:
            _LOADING_CHECKPOINT.reset(token)

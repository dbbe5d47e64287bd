"""A pretrained transformer encoder (BERT class) fine-tuned to classify listing texts.

Word pieces -> any Hugging Face encoder (``transformers.AutoModel``, default
``sentence-transformers/all-MiniLM-L6-v2``) -> mean of its last hidden states over the text's word pieces ->
dropout -> feature layer (Linear + GELU, reused by the fusion model and by ``embed``) -> dropout -> classes; plus,
by default, a lexical head (``_lexical``: a linear model over hashed word 1-2-gram TF-IDF, fitted after the
encoder) whose scores, times a weight chosen on validation texts, join the logits. ``predict_proba`` divides the
logits by a temperature fitted on validation texts (``training.text_transformer``).

A text longer than ``max_length`` word pieces keeps its first ``head_length`` pieces and its last ones (head +
tail truncation): a listing's title and first lines say most, and its last lines often name the item again.
Texts are read raw (the tokenizer lower-cases and splits them itself): stop words and punctuation carry meaning
for a transformer.

Checkpoint: ``config.json`` holds this class's arguments and the encoder's own configuration (``encoder_config``),
so loading builds the encoder with ``AutoModel.from_config`` and downloads nothing; ``model.safetensors`` holds the
encoder and the head; the tokenizer's files are in ``tokenizer/`` (``_save_extra_files``), covered by the weights'
checksums like ``config.json``, so the model also travels inside a fusion checkpoint.

A new model (``encoder_config`` None) loads the pretrained encoder and its tokenizer from ``encoder``, a hub id or a
folder; a model rebuilt from a checkpoint gets its tokenizer from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn

from ..data.text import TextPreprocessor
from ._calibration import TemperatureMixin, checked_temperature
from ._checkpoint import TorchCheckpointMixin
from ._lexical import LexicalHead
from ._listings import l2_normalize_rows
from ._registry import register_model
from .errors import CheckpointError, ModelConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls")
#: Folder of the tokenizer's files inside a checkpoint.
TOKENIZER_FOLDER = "tokenizer"
# Inference batch size: texts are sorted by length first, so a batch is padded to similar lengths.
_PREDICT_BATCH = 64


class PretrainedEncoderError(CheckpointError):
    """The pretrained encoder or its tokenizer cannot be loaded by the name or folder given."""


@dataclass(frozen=True)
class EncodedTexts:
    """Word-piece ids of texts, each truncated to ``max_length`` with its special tokens, not padded."""

    ids: list[list[int]]
    #: [n] word pieces of each text (all of it, before truncation) that are neither unknown nor special.
    known: np.ndarray


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, longest] padded with ``pad_id`` and the attention mask [n, longest] (1 on real tokens)."""
    width = max((len(row) for row in ids), default=1)
    padded = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for index, row in enumerate(ids):
        padded[index, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[index, :len(row)] = 1
    return padded, mask


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers: its longest ``ModuleList`` (``encoder.layer`` in BERT,
    ``transformer.layer`` in DistilBERT)."""
    stacks = [module for module in encoder.modules() if isinstance(module, nn.ModuleList)]
    if not stacks:
        raise ModelConfigError(f"cannot find the layers of the encoder {type(encoder).__name__}")
    return max(stacks, key=len)


def _encoder_config_dict(config: Any) -> dict[str, Any]:
    """The encoder's configuration as JSON-ready data, without the keys that only record how it was saved."""
    values = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "id2label", "label2id"):
        values.pop(key, None)
    return values


def _pretrained(encoder: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A pretrained encoder (float32) and its tokenizer by Hugging Face hub id or folder; a clear error otherwise."""
    from transformers import AutoModel, AutoTokenizer  # imported when used: a second and a half at startup
    try:
        return AutoModel.from_pretrained(encoder, dtype=torch.float32), AutoTokenizer.from_pretrained(encoder)
    except (OSError, ValueError) as exc:
        raise PretrainedEncoderError(
            f"cannot load the pretrained encoder {encoder!r} ({type(exc).__name__}: {exc}). Pass a Hugging Face hub "
            "id the machine can reach, or a folder holding the encoder and its tokenizer (save_pretrained); offline, "
            "eval \"$(bash ../shared/pretrained/setup_hf_cache.sh)\" lays out the default one in the hub cache"
        ) from exc


@register_model("text-transformer")
class TextTransformerClassifier(nn.Module, TemperatureMixin, TorchCheckpointMixin):
    """A transformer encoder with mean pooling, a feature layer and a linear head, over raw listing texts."""

    input_kind = "text"
    description = (
        "Text transformer: a pretrained BERT-class encoder fine-tuned on the listing name and description (head + "
        "tail truncated word pieces), mean pooling, dropout, a feature layer and a linear classifier, plus a lexical "
        "head (linear SVM over hashed word 1-2-gram TF-IDF) added to its logits, calibrated by a temperature fitted "
        "on validation texts."
    )

    def __init__(
        self,
        classes: list[str],
        encoder: str = DEFAULT_ENCODER,
        encoder_config: dict[str, Any] | None = None,
        max_length: int = 256,
        head_length: int = 192,
        pooling: str = "mean",
        feature_dim: int = 256,
        dropout: float = 0.1,
        lexical_features: int = 2**20,
        lexical_preprocessing: dict[str, Any] | None = None,
        lexical_weight: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not classes:
            raise ModelConfigError("TextTransformerClassifier needs at least one class")
        if pooling not in POOLINGS:
            raise ModelConfigError(f"pooling must be one of {list(POOLINGS)}, not {pooling!r}")
        if lexical_features < 0:
            raise ModelConfigError(f"lexical_features must be 0 (none) or more, not {lexical_features}")
        if max_length < 8 or not 0 <= head_length <= max_length:
            raise ModelConfigError(f"max_length must be at least 8 and head_length between 0 and max_length, got "
                                   f"max_length={max_length}, head_length={head_length}")
        self.classes = list(classes)
        self.temperature = checked_temperature(temperature)
        self.max_length = max_length
        self.head_length = head_length
        self.pooling = pooling
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if encoder_config is None:
            self.encoder, self.tokenizer = _pretrained(encoder)
            encoder_config = _encoder_config_dict(self.encoder.config)
        else:
            values = dict(encoder_config)
            model_type = values.pop("model_type", None)
            if not model_type:
                raise ModelConfigError("encoder_config needs the encoder's 'model_type' (e.g. 'bert')")
            # Weights come from the checkpoint (or the model being copied), never from a download.
            from transformers import AutoConfig, AutoModel

            self.encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **values)).float()
        if getattr(self.encoder, "pooler", None) is not None:
            # BERT's pooler (a dense layer over [CLS]) is unused by the pooling here: dropped, so no weight is
            # saved for nothing and DDP finds no parameter without a gradient.
            self.encoder.pooler = None
        self.encoder_config = encoder_config
        hidden = int(self.encoder.config.hidden_size)
        if max_length > int(getattr(self.encoder.config, "max_position_embeddings", max_length)):
            raise ModelConfigError(f"max_length {max_length} exceeds the encoder's "
                                   f"{self.encoder.config.max_position_embeddings} positions")
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Linear(hidden, feature_dim)
        self.classifier = nn.Linear(feature_dim, len(self.classes))
        #: Width of ``features`` (what the fusion model's concat head reads).
        self.feature_dim = feature_dim
        #: The wide part (``_lexical``), fitted after the encoder; its scores times ``lexical_weight`` join the logits.
        self.lexical: LexicalHead | None = None
        self.lexical_weight = float(lexical_weight)
        if lexical_features:
            lexical_preprocessing = lexical_preprocessing or TextPreprocessor().to_config()
            self.lexical = LexicalHead(len(self.classes), lexical_features, lexical_preprocessing)
        self._record_config(encoder_config=encoder_config, lexical_preprocessing=lexical_preprocessing)
        self.eval()

    # ---- the tokenizer as checkpoint files ---------------------------------------------------------
    def _save_extra_files(self, folder: Path) -> list[str]:
        tokenizer = self._checked_tokenizer()
        target = folder / TOKENIZER_FOLDER
        saved = tokenizer.save_pretrained(str(target))
        return sorted(Path(path).relative_to(folder).as_posix() for path in saved if Path(path).is_file())

    def _load_extra_files(self, folder: Path) -> None:
        target = folder / TOKENIZER_FOLDER
        if not target.is_dir():
            raise CheckpointError(f"{target}: missing; a text-transformer checkpoint needs its tokenizer's files")
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{target}: not a readable tokenizer ({exc})") from exc

    def _checked_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ModelConfigError("this text-transformer has no tokenizer: load it from a checkpoint "
                                   "(load_model) or create it from a pretrained encoder")
        return self.tokenizer

    # ---- tensors ---------------------------------------------------------------------------------
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[n, feature_dim] feature-layer activations of padded word-piece ids and their attention mask."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(2).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return F.gelu(self.feature(self.dropout(pooled)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[n, n_classes] uncalibrated logits."""
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))

    def _int8_layers(self) -> list[str]:
        # Each transformer layer's feed-forward expansion (its widest linear layer): /text p50 34.2 -> 28.6 ms at
        # the same accuracy (reports/bench_serving_text_transformer*.md). Quantizing the attention projections or
        # the feed-forward output too (inputs with outliers) was faster but cost about a point on validation texts.
        names = {id(module): name for name, module in self.named_modules()}
        return [names[id(max((module for module in layer.modules() if isinstance(module, nn.Linear)),
                             key=lambda linear: linear.out_features))] for layer in encoder_layers(self.encoder)]

    # ---- raw text ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> EncodedTexts:
        """Word-piece ids of raw texts with the encoder's special tokens, head + tail truncated to ``max_length``,
        and how many known word pieces each text has."""
        tokenizer = self._checked_tokenizer()
        if not texts:  # the tokenizer itself fails on an empty list
            return EncodedTexts(ids=[], known=np.zeros(0, dtype=np.int64))
        # verbose=False: texts longer than the encoder's limit are expected here; they are truncated below.
        encoded = tokenizer(list(texts), truncation=False, verbose=False, return_special_tokens_mask=True)
        unknown_or_special = set(tokenizer.all_special_ids)
        ids, known = [], []
        for row, special in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True):
            # The encoder's own special tokens ([CLS] ... [SEP], <s> ... </s>) stay around the truncated text.
            start = special.index(0) if 0 in special else len(special)
            end = len(special) - special[::-1].index(0) if 0 in special else start
            prefix, pieces, suffix = row[:start], row[start:end], row[end:]
            known.append(sum(piece not in unknown_or_special for piece in pieces))
            budget = self.max_length - len(prefix) - len(suffix)
            if len(pieces) > budget:
                head = min(self.head_length, budget)
                pieces = pieces[:head] + pieces[len(pieces) - (budget - head):]
            ids.append(prefix + pieces + suffix)
        return EncodedTexts(ids=ids, known=np.asarray(known, dtype=np.int64))

    def known_token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """[n] word pieces of each text that are neither unknown nor special; 0: the text told the model nothing."""
        return self.tokenize(texts).known

    def _batched(self, texts: Sequence[str], function: Any, width: int) -> np.ndarray:
        """``function(ids, mask)`` over the texts in inference mode, in batches of similar lengths, in text order."""
        tokenizer = self._checked_tokenizer()
        encoded = self.tokenize(texts).ids
        order = np.argsort([len(row) for row in encoded], kind="stable")
        device = next(self.parameters()).device
        output = np.zeros((len(encoded), width), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), _PREDICT_BATCH):
                    chosen = order[start:start + _PREDICT_BATCH]
                    ids, mask = pad_batch([encoded[i] for i in chosen], tokenizer.pad_token_id or 0)
                    output[chosen] = function(ids.to(device), mask.to(device)).float().cpu().numpy()
        finally:
            self.train(was_training)
        return output

    def extract_features(self, texts: Sequence[str]) -> np.ndarray:
        """[n, feature_dim] feature-layer activations of raw texts (the text half of the fusion model's input)."""
        return self._batched(texts, self.features, self.feature_dim)

    @property
    def embedding_dim(self) -> int:
        """Width of ``embed``'s vectors: the feature layer's."""
        return self.feature_dim

    def embed(self, images: Any = None, texts: Sequence[str] | None = None) -> np.ndarray:
        """[n, embedding_dim] float32 feature-layer vectors of raw texts, each row of unit length (for search)."""
        if texts is None:
            raise ValueError("TextTransformerClassifier.embed needs texts=[...]; this model does not use images")
        return l2_normalize_rows(self.extract_features(texts))

    def set_lexical_weight(self, weight: float) -> None:
        """How much the lexical head's scores count in ``logits`` (fitted on validation texts), recorded in the
        config."""
        self.lexical_weight = float(weight)
        self._record_config(lexical_weight=self.lexical_weight)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """[n, n_classes] uncalibrated logits of raw texts (what the temperature is fitted on): the encoder's head,
        plus ``lexical_weight`` x the lexical head's scores when the model has one."""
        logits = self._batched(texts, self, len(self.classes))
        if self.lexical is not None and len(texts):
            logits += self.lexical_weight * self.lexical.scores(texts)
        return logits

    def predict_proba(self, images: Any = None, texts: Sequence[str] | None = None) -> np.ndarray:
        """[n, n_classes] calibrated class probabilities of raw texts; an empty or all-unknown text still gets a
        row (the special tokens alone go through the encoder)."""
        if texts is None:
            raise ValueError("TextTransformerClassifier.predict_proba needs texts=[...]; this model does not use "
                             "images")
        return softmax(self.logits(texts) / self.temperature, axis=1).astype(np.float32)

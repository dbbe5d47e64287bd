"""Quantized inference for serving: a loaded model's linear layers with int8 weights.

``int8`` is dynamic quantization: a linear layer's weights are stored as int8 per output channel, and its input is
quantized on the fly per call, so nothing needs calibrating. Each model names the layers where it pays
(``CheckpointMixin._int8_layers``): a text transformer's feed-forward expansions; photo models and the text CNN
spend their time in convolutions and name none. A quantized model predicts almost, not exactly, what its float
weights do: measure it on your data first (``scripts/evaluate.py --quantization int8``). It is never saved: the
checkpoint keeps the float weights.
"""

from __future__ import annotations

import warnings

from torch import nn

from .errors import ModelConfigError

#: The quantizations ``load_model(..., quantization=...)`` and the server's ``MARKETPLACE_QUANTIZATION`` accept.
QUANTIZATIONS = ("int8",)


def check_quantization(kind: str) -> None:
    """Raise ``ModelConfigError`` unless ``kind`` is one of ``QUANTIZATIONS``."""
    if kind not in QUANTIZATIONS:
        raise ModelConfigError(f"unknown quantization {kind!r}; known: {', '.join(QUANTIZATIONS)}")


def quantize_linear_layers(module: nn.Module, kind: str, names: list[str]) -> None:
    """Replace the ``nn.Linear`` layers of ``module`` named ``names`` in place by their ``kind`` quantized form
    (inference only)."""
    check_quantization(kind)
    # torch's eager dynamic quantization (fbgemm int8 kernels) is deprecated upstream in favour of torchao but still
    # shipped by the pinned torch; its deprecation warnings would greet every server start, so they are muted here
    # and tests/test_quantization.py fails loudly the day an upgrade removes it.
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*", category=UserWarning)
        module.eval()
        quantize_dynamic(module, dict.fromkeys(names, per_channel_dynamic_qconfig), inplace=True)

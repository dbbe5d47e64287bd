"""A photo's vector for similar-listing search: several backbone stages and its colours, whitened for matching.

Trained to name 13 categories, a backbone's last pooled output keeps what a photo shows and loses what tells one
listing's sofa from another's. Earlier stages keep parts, textures and colours, and a colour histogram keeps the
room a seller photographs in. So a photo's descriptor is, concatenated: the average-pooled outputs of the backbone's
last ``stages`` stages and its pooled output, each centred and scaled to unit length, and the square root of its
joint RGB histogram (``colour_bins`` levels per channel) times ``colour_weight``. A learned whitening (Mikolajczyk
and Matas) then maps it to ``dim`` dimensions: directions in which two photos of one listing differ are shrunk,
the widest remaining directions kept. The trainer fits it on the pairs of photos of each training listing
(``training.image_classifier.fit_retrieval``); reports/bench_search_retrieval.md measures it on held-out listings.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import ModelConfigError

DEFAULT_RETRIEVAL: dict[str, Any] = {"dim": 512, "stages": 4, "colour_bins": 8, "colour_weight": 1.5}


def checked_retrieval(retrieval: dict[str, Any]) -> dict[str, Any]:
    """``retrieval`` with every key of ``DEFAULT_RETRIEVAL`` (defaults filled in), or a clear error."""
    unknown = set(retrieval) - set(DEFAULT_RETRIEVAL)
    if unknown:
        raise ModelConfigError(f"retrieval: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULT_RETRIEVAL)}")
    settings = {**DEFAULT_RETRIEVAL, **retrieval}
    for key in ("dim", "stages", "colour_bins"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ModelConfigError(f"retrieval {key} must be a positive integer, not {settings[key]!r}")
    if settings["colour_weight"] < 0:
        raise ModelConfigError(f"retrieval colour_weight must be 0 or more, not {settings['colour_weight']}")
    return settings


class RetrievalDescriptor(nn.Module):
    """``describe(backbone, x, pixels)`` -> raw descriptors [n, input_dim]; ``forward(raw)`` -> vectors [n, dim].

    The buffers (``block_mean``, ``mean``, ``projection``) are zeros until the trainer sets them (``set_whitening``)."""

    def __init__(self, block_widths: list[int], dim: int, stages: int, colour_bins: int, colour_weight: float) -> None:
        super().__init__()
        self.block_widths = [*block_widths, colour_bins**3]
        self.stages, self.colour_bins, self.colour_weight, self.dim = stages, colour_bins, colour_weight, dim
        input_dim = sum(self.block_widths)
        if dim > input_dim:
            raise ModelConfigError(f"retrieval dim {dim} exceeds the descriptor's {input_dim} dimensions")
        self.register_buffer("block_mean", torch.zeros(input_dim))
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("projection", torch.zeros(input_dim, dim))

    @staticmethod
    def backbone_widths(backbone: nn.Module, stages: int, image_size: int) -> list[int]:
        """Widths of the pooled stage outputs and pooled output ``describe`` takes from ``backbone``."""
        was_training = backbone.training
        backbone.eval()  # a probe: norm layers must neither see a batch of one nor update their statistics
        try:
            with torch.inference_mode():
                blocks = _backbone_blocks(backbone, torch.zeros(1, 3, image_size, image_size), stages)
        finally:
            backbone.train(was_training)
        return [block.shape[1] for block in blocks]

    def describe(self, backbone: nn.Module, x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Raw descriptors [n, input_dim] of normalised photos ``x`` and their uint8 ``pixels`` [n, 3, h, w]."""
        return torch.cat([*_backbone_blocks(backbone, x, self.stages), self._colour_histogram(pixels)], dim=1)

    def _colour_histogram(self, pixels: torch.Tensor) -> torch.Tensor:
        levels = (pixels.long() * self.colour_bins) // 256  # [n, 3, h, w] in 0 .. bins - 1
        cells = (levels[:, 0] * self.colour_bins + levels[:, 1]) * self.colour_bins + levels[:, 2]
        counts = torch.zeros(len(pixels), self.colour_bins**3, device=pixels.device)
        counts.scatter_add_(1, cells.flatten(1), torch.ones_like(cells.flatten(1), dtype=counts.dtype))
        return counts / cells[0].numel()

    def normalized_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        """Each backbone block centred (``block_mean``) and scaled to unit length, the colour block the unit-length
        square root of the histogram times ``colour_weight``: what the whitening reads."""
        *backbone_parts, colour = torch.split(raw, self.block_widths, dim=1)
        means = torch.split(self.block_mean, self.block_widths)
        parts = [nn.functional.normalize(part - mean, dim=1) for part, mean in zip(backbone_parts, means)]
        return torch.cat([*parts, self.colour_weight * nn.functional.normalize(colour.sqrt(), dim=1)], dim=1)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return (self.normalized_blocks(raw) - self.mean) @ self.projection

    def set_whitening(self, block_mean: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> None:
        """Set the fitted centring and whitening (shapes as the buffers)."""
        for name, value in (("block_mean", block_mean), ("mean", mean), ("projection", projection)):
            buffer = getattr(self, name)
            if value.shape != buffer.shape:
                raise ModelConfigError(f"retrieval {name}: shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            buffer.copy_(value)


def _backbone_blocks(backbone: nn.Module, x: torch.Tensor, stages: int) -> list[torch.Tensor]:
    """Average-pooled outputs [n, width] of the backbone's last ``stages`` stages (every stage, as timm's
    ``forward_intermediates(extra_blocks=True)`` counts them where it can), then its pooled output."""
    if not hasattr(backbone, "forward_intermediates"):
        raise ModelConfigError(f"{type(backbone).__name__} has no forward_intermediates(): it cannot give a "
                               "retrieval descriptor (pass retrieval=None)")
    options = {"extra_blocks": True} if "extra_blocks" in inspect.signature(backbone.forward_intermediates).parameters \
        else {}
    final, intermediates = backbone.forward_intermediates(x, indices=stages, **options)
    return [*(t.float().mean(dim=(2, 3)) for t in intermediates), backbone.forward_head(final, pre_logits=True).float()]


"""Temperature scaling at prediction time: a calibrated classifier divides its logits by a fitted temperature."""

from __future__ import annotations

import math

from .errors import ModelConfigError


def checked_temperature(value: float) -> float:
    """``value`` as a float, refused unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ModelConfigError(f"temperature must be a positive number, not {value!r}")
    return float(value)


class TemperatureMixin:
    """``calibrate(t)`` for a classifier whose ``predict_proba`` is the softmax of its logits / ``temperature``."""

    temperature: float

    def calibrate(self, temperature: float) -> None:
        """Set the temperature ``predict_proba`` divides the logits by, and record it in the config."""
        self.temperature = checked_temperature(temperature)
        self._record_config(temperature=self.temperature)  # type: ignore[attr-defined]  # CheckpointMixin's

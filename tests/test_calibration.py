"""Calibration: the expected calibration error on hand-made predictions, temperature scaling per row and per group."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from marketplace_reco.training.calibration import fit_temperature
from marketplace_reco.training.metrics import evaluate, expected_calibration_error


def test_expected_calibration_error_by_hand() -> None:
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.58, 0.42], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    # Bin (13/15, 14/15]: confidence 0.9, accuracy 1/2. Bin (8/15, 9/15]: confidence 0.565, accuracy 1.
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.565)
    assert expected_calibration_error(labels, proba) == pytest.approx(expected)
    assert evaluate(labels, proba, ["a", "b"])["ece"] == pytest.approx(expected)
    # Ten predictions at 70% confidence of which seven are right: perfectly calibrated.
    calibrated = np.tile([0.7, 0.3], (10, 1))
    assert expected_calibration_error(np.array([0] * 7 + [1] * 3), calibrated) == pytest.approx(0.0)
    # The same predictions all right: 30 points under-confident.
    assert expected_calibration_error(np.zeros(10, dtype=int), calibrated) == pytest.approx(0.3)


def _overconfident(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a classifier right about 60% of the time but nearly certain every time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), labels] += 1.0
    return 8.0 * logits, labels


def _nll(scores: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(scores / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def test_a_fitted_temperature_lowers_the_nll_and_ece_of_an_overconfident_model() -> None:
    scores, labels = _overconfident(2000)
    temperature = fit_temperature(scores, labels)
    assert temperature > 2.0
    assert _nll(scores, labels, temperature) < _nll(scores, labels, 1.0) - 0.5
    ece_before = expected_calibration_error(labels, softmax(scores, axis=1))
    assert expected_calibration_error(labels, softmax(scores / temperature, axis=1)) < ece_before / 3
    assert fit_temperature(scores / temperature, labels) == pytest.approx(1.0, rel=1e-2)  # already calibrated


def test_a_temperature_fitted_per_group_scores_the_groups_mean_probabilities() -> None:
    scores, labels = _overconfident(600, seed=1)
    groups = np.repeat(np.arange(300), 2)
    labels = np.repeat(labels[::2], 2)  # the two photos of a product share its label

    def group_nll(temperature: float) -> float:
        proba = softmax(scores / temperature, axis=1).reshape(300, 2, 4).mean(axis=1)
        return float(-np.log(proba[np.arange(300), labels[::2]]).mean())

    per_group = fit_temperature(scores, labels, groups=groups)
    per_row = fit_temperature(scores, labels)
    assert per_group != pytest.approx(per_row, rel=1e-3)
    assert group_nll(per_group) <= group_nll(per_row)
    assert group_nll(per_group) < group_nll(per_group * 1.2) and group_nll(per_group) < group_nll(per_group / 1.2)
    with pytest.raises(ValueError, match="labels differ within a group"):
        fit_temperature(scores, np.arange(600) % 4, groups=groups)

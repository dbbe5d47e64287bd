"""Temperature scaling: one scalar that makes a model's probabilities mean what they say (Guo et al., 2017)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from .metrics import expected_calibration_error


def mean_nll(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of ``labels`` [n] under softmax(``scores`` [n, n_classes])."""
    return float(-log_softmax(scores, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> float:
    """The T minimising the negative log-likelihood of softmax(scores / T) on held-out data (searched over log T).

    ``scores`` [n, n_classes] are logits or any scores a softmax turns into probabilities; ``labels`` [n] the
    true class indices. With ``groups`` [n] (e.g. the product of each photo), the likelihood is that of each
    group's mean probabilities, the way a product's photos are combined; ``labels`` must then agree within a
    group. Dividing by T never changes a row's argmax, only the confidence.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if groups is None:
        def _nll(log_t: float) -> float:
            return mean_nll(scores / np.exp(log_t), labels)
    else:
        grouping = pd.Series(labels).groupby(np.asarray(groups), sort=False)
        if (grouping.nunique() > 1).any():
            raise ValueError("fit_temperature: labels differ within a group")
        group_index = grouping.ngroup().to_numpy()
        group_labels = grouping.first().to_numpy()
        sizes = np.bincount(group_index)

        def _nll(log_t: float) -> float:
            mean = np.zeros((len(sizes), scores.shape[1]))
            np.add.at(mean, group_index, softmax(scores / np.exp(log_t), axis=1))
            mean /= sizes[:, None]
            return float(-np.log(np.maximum(mean[np.arange(len(sizes)), group_labels], 1e-300)).mean())

    return float(np.exp(minimize_scalar(_nll, bounds=(-6.0, 6.0), method="bounded").x))


def calibrate_on_texts(scores: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, object]]:
    """The temperature fitted on validation texts' ``scores`` (logits or log-probabilities) and its record for a
    training run's metrics: the expected calibration error before and after."""
    temperature = fit_temperature(scores, labels)
    return temperature, {
        "temperature": temperature,
        "fitted_on": "validation texts",
        "validation_ece_before": expected_calibration_error(labels, softmax(scores, axis=1)),
        "validation_ece_after": expected_calibration_error(labels, softmax(scores / temperature, axis=1)),
    }

"""Temperature scaling: one scalar that makes a model's probabilities mean what they say (Guo et al., 2017)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of softmax(scores / T) on held-out data (searched over log T).

    ``scores`` [n, n_classes] are logits or any scores a softmax turns into probabilities; ``labels`` [n] the
    true class indices. Dividing by T never changes the argmax, only the confidence.
    """

    def _nll(log_t: float) -> float:
        return float(-log_softmax(scores / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    return float(np.exp(minimize_scalar(_nll, bounds=(-6.0, 6.0), method="bounded").x))

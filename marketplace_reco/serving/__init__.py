"""Serving: the FastAPI app (``create_app``) and the same predictions in Python (``Predictor``)."""

from .app import create_app
from .predictor import ModelOutputError, Predictor, PredictorInputError
from .schemas import Prediction
from .settings import ServingSettings

__all__ = ["ModelOutputError", "Prediction", "Predictor", "PredictorInputError", "ServingSettings", "create_app"]

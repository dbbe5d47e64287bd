"""What the server serves: ``GET /models`` and ``GET /models/{name}``."""

from __future__ import annotations

from fastapi import APIRouter

from ..dependencies import PoolDep
from ..pool import ModelPool
from ..predictor import Predictor
from ..schemas import ErrorResponse, ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"])


def _info(pool: ModelPool, predictor: Predictor) -> ModelInfo:
    return ModelInfo(**predictor.describe(), endpoints=pool.endpoints_of(predictor.name))


@router.get("", response_model=ModelList, summary="Every loaded model")
async def list_models(pool: PoolDep) -> ModelList:
    return ModelList(models=[_info(pool, predictor) for predictor in pool.predictors()])


# ``:path`` because hub ids (``user/repo``) and ``s3://`` names contain slashes.
@router.get("/{name:path}", response_model=ModelInfo, summary="One model: type, classes, preprocessing, metrics",
            responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_model(name: str, pool: PoolDep) -> ModelInfo:
    return _info(pool, pool.predictor(name))

"""Operational endpoints: liveness and readiness (open even when the server needs API keys)."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from ..dependencies import PoolDep
from ..schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="The process is alive (models may still be loading)")
async def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, summary="200 once every configured model is loaded and warmed up",
            responses={503: {"model": Readiness, "description": "some model is loading or failed to load"}})
async def ready(pool: PoolDep) -> JSONResponse:
    readiness = Readiness(ready=pool.ready, models=dict(pool.status))
    code = status.HTTP_200_OK if readiness.ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(readiness.model_dump(), status_code=code)


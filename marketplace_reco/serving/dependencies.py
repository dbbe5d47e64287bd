"""FastAPI dependencies for the state an app shares between requests (set up in ``create_app``).

They are ``async`` although they never await: FastAPI would run plain functions in a worker thread, and that
thread hop per dependency per request was a measurable share of a /text request's time.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .metrics import Metrics
from .pool import ModelPool
from .settings import ServingSettings


async def get_settings(request: Request) -> ServingSettings:
    return request.app.state.settings


async def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[ServingSettings, Depends(get_settings)]
PoolDep = Annotated[ModelPool, Depends(get_pool)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

"""Prometheus metrics: ``GET /metrics`` (behind the API keys when the server has some)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..dependencies import MetricsDep

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)

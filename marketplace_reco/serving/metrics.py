"""Prometheus metrics: requests by route and status, request latency, micro-batch sizes, model-call time.

Each app has its own registry, so several apps (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's collectors, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("marketplace_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("marketplace_http_request_duration_seconds", "time to answer an HTTP request",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("marketplace_batch_size", "inputs per model call (micro-batch size)",
                                    ["model"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.inference = Histogram("marketplace_inference_duration_seconds", "time of one batched model call",
                                   ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model=model).observe(size)
        self.inference.labels(model=model).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format of every collector."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request by its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            # Raw paths of unmatched requests would make the label set unbounded.
            template = getattr(route, "path", "<unmatched>")
            method = scope["method"]
            self.metrics.latency.labels(method=method, route=template).observe(time.perf_counter() - started)
            self.metrics.requests.labels(method=method, route=template, status=str(status)).inc()

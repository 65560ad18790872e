"""GET /metrics: the app's own Prometheus registry in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import MetricsDep, ServiceDep
from ..schemas import ErrorResponse

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"},
    401: {"model": ErrorResponse}})
async def metrics(service: ServiceDep, m: MetricsDep) -> Response:
    """Prometheus metrics (requests by route/status, latency and batch-size histograms, queue depth, runs)."""
    for name, rt in service.models.items():
        m.queue_depth.labels(name).set(rt.batcher.depth if rt.batcher is not None else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

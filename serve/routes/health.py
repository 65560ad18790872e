"""Liveness and readiness probes (+ KServe /v2/health/* aliases); never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import ServiceDep
from ..schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=HealthStatus)
@router.get("/v2/health/live", response_model=HealthStatus, include_in_schema=False)
async def live() -> HealthStatus:
    """The process is up and answering."""
    return HealthStatus(status="ok")


@router.get("/health/ready", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
@router.get("/v2/health/ready", response_model=HealthStatus, include_in_schema=False)
async def ready(service: ServiceDep) -> JSONResponse:
    """200 once every model is loaded and warmed; 503 while loading (or when a model failed to load)."""
    models = {name: rt.ready for name, rt in service.models.items()}
    if all(models.values()):
        status, code = "ok", 200
    elif service.loaded.is_set():
        status, code = "unavailable", 503
    else:
        status, code = "loading", 503
    return JSONResponse(HealthStatus(status=status, models=models).model_dump(), status_code=code,
                        headers=None if code == 200 else {"Retry-After": "1"})

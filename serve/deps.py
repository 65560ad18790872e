"""Typed FastAPI dependencies: routes take `service: ServiceDep` (and friends) instead of reading app.state, so a
test can swap any of them with `app.dependency_overrides[get_service] = ...`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import InvalidHeader
from .metrics import ServeMetrics
from .service import GenerationService
from .settings import ServeSettings


def get_service(request: Request) -> GenerationService:
    """The app's generation service (built by create_app)."""
    return request.app.state.service


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServeMetrics:
    return request.app.state.metrics


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
MetricsDep = Annotated[ServeMetrics, Depends(get_metrics)]


def request_timeout_s(settings: SettingsDep, x_timeout_ms: Annotated[int | None, Header(
        ge=1, description="Per-request deadline: a positive integer number of milliseconds, at most the server's "
        "timeout (422 otherwise)")] = None) -> float | None:
    """The client's deadline in seconds (None: the server's timeout); InvalidHeader (422) beyond the server's limit."""
    if x_timeout_ms is None:
        return None
    if x_timeout_ms > settings.max_timeout_ms:
        raise InvalidHeader(f"X-Timeout-Ms: must be a positive integer number of milliseconds from 1 to "
                            f"{settings.max_timeout_ms} (this server's timeout), got {x_timeout_ms}",
                            param="X-Timeout-Ms")
    return x_timeout_ms / 1000.0


TimeoutDep = Annotated[float | None, Depends(request_timeout_s)]

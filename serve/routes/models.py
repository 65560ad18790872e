"""GET /v1/models, /v1/models/{name}: Quickstep's model info, shaped so OpenAI's `client.models.list()` and
`client.models.retrieve(name)` read it too (id, object, created, owned_by; the list also as {object, data})."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServiceDep
from ..schemas import ErrorResponse, ModelInfo, ModelList

router = APIRouter(tags=["models"])
_ERR = {404: {"model": ErrorResponse}, 401: {"model": ErrorResponse}}


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(service: ServiceDep) -> ModelList:
    """Every served model with its shapes, steps, class names, sizes and readiness."""
    infos = [service.info(rt) for rt in service.models.values()]
    return ModelList(data=infos, models=infos)


@router.get("/v1/models/{name}", response_model=ModelInfo, responses=_ERR)
async def get_model(name: str, service: ServiceDep) -> ModelInfo:
    """One model (404 when unknown); includes the manifest's quality section when present."""
    return service.info(service.resolve(name))

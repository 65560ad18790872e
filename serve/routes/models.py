"""GET /v1/models, /v1/models/{name} (+ KServe-style /v2/models/{name}[/ready])."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..schemas import ErrorResponse, ModelInfo, ModelList
from ..service import GenerationService

router = APIRouter(tags=["models"])
_ERR = {404: {"model": ErrorResponse}, 401: {"model": ErrorResponse}}


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> ModelList:
    """Every served model with its shapes, steps and readiness."""
    service: GenerationService = request.app.state.service
    return ModelList(models=[service.info(rt) for rt in service.models.values()])


@router.get("/v1/models/{name}", response_model=ModelInfo, responses=_ERR)
async def get_model(name: str, request: Request) -> ModelInfo:
    """One model (404 when unknown); includes the manifest's quality section when present."""
    service: GenerationService = request.app.state.service
    return service.info(service.resolve(name))


@router.get("/v2/models/{name}", responses=_ERR)
async def kserve_model(name: str, request: Request) -> dict:
    """KServe v2 model metadata: name, platform, inputs/outputs with datatypes and shapes."""
    service: GenerationService = request.app.state.service
    rt = service.resolve(name)
    g = rt.bundle.graphs[rt.bundle.default_steps]
    dt = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "uint8": "UINT8"}

    def spec(s):
        return {"name": s.name, "datatype": dt.get(s.dtype, s.dtype.upper()),
                "shape": [-1 if isinstance(d, str) else d for d in s.shape]}

    return {"name": rt.name, "versions": ["1"], "platform": rt.backend.name,
            "inputs": [spec(s) for s in g.inputs], "outputs": [spec(s) for s in g.outputs]}


@router.get("/v2/models/{name}/ready", responses=_ERR)
async def kserve_model_ready(name: str, request: Request) -> JSONResponse:
    """200 when the model is loaded and warmed, else 503."""
    service: GenerationService = request.app.state.service
    rt = service.resolve(name)
    return JSONResponse({"name": rt.name, "ready": rt.ready}, status_code=200 if rt.ready else 503)

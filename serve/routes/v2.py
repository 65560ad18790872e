"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP): server and model metadata, readiness, and inference
with the binary-tensor-data extension, on the same service and batcher as /v1/generate.

Model NAME takes `seed` INT64 [B], optional `class_label` INT64 [B] (conditional models; drawn from each seed when
omitted) and optional `steps` INT32 [1]; it returns `images` UINT8 [B, H, W, C] - the output tensor of the Triton
repository `quickstep-export triton` writes.  Image i has the pixels of /v1/generate's image 0 for seed[i].
Each graph is also served under its name in that repository (NAME_{k}step, NAME_heun{k}) with its raw inputs
(noise FP32 [B, C, H, W], noise2, class_labels INT64 [B, 1]), so one tritonclient script works against both.
Errors are {"error": "<message>"}: 400 for a bad request, 404 for an unknown model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from quickstep.artifacts import triton_model_name

from ..deps import ServiceDep, SettingsDep, TimeoutDep
from ..errors import InvalidRequest, ModelNotFound, UnsupportedMediaType
from ..schemas import (
    MAX_SEED,
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2ServerMetadata,
    V2TensorMetadata,
)
from ..service import GenerationService, ModelRuntime
from .generate import disconnect_watch

router = APIRouter(tags=["v2"])
_ERR = {code: {"model": V2Error} for code in (400, 401, 404, 413, 415, 422, 429, 431, 503, 504)}
HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
OUTPUT = "images"


def inline_schema(model: type) -> dict[str, Any]:
    """A pydantic model's JSON schema with its $defs inlined (for openapi_extra, which has no components)."""
    schema = model.model_json_schema()  # type: ignore[attr-defined]
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


@dataclass(frozen=True)
class V2Model:
    """A model as v2 names it: the bundle NAME (seed inputs), or NAME_{k}step / NAME_heun{k} (one graph, raw noise
    inputs: the layout of the Triton repository `quickstep-export triton` writes)."""

    name: str
    rt: ModelRuntime
    graph_steps: int | None = None  # set for the Triton-layout models

    def inputs(self) -> dict[str, V2TensorMetadata]:
        b = self.rt.bundle
        if self.graph_steps is not None:  # as Triton reports the exported config.pbtxt: [-1] + dims
            dt = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8"}
            return {t.name: V2TensorMetadata(name=t.name, datatype=dt[t.dtype],  # type: ignore[arg-type]
                                             shape=[-1] + ([int(d) for d in t.shape[1:]] or [1]))
                    for t in b.graphs[self.graph_steps].inputs}
        out = {"seed": V2TensorMetadata(name="seed", datatype="INT64", shape=[-1])}
        if b.num_classes:
            out["class_label"] = V2TensorMetadata(name="class_label", datatype="INT64", shape=[-1])
        out["steps"] = V2TensorMetadata(name="steps", datatype="INT32", shape=[1])
        return out

    def output(self) -> V2TensorMetadata:
        c, h, w = self.rt.bundle.image_shape
        return V2TensorMetadata(name=OUTPUT, datatype="UINT8", shape=[-1, h, w, c])


def resolve(service: GenerationService, name: str) -> V2Model:
    """A bundle name, or the Triton-layout name of one of its graphs; ModelNotFound naming all of them."""
    if name in service.models:
        return V2Model(name, service.models[name])
    names = []
    for rt in service.models.values():
        for k in rt.bundle.steps_supported:
            alias = triton_model_name(rt.name, rt.bundle.kind, k)
            if alias == name:
                return V2Model(name, rt, k)
            names.append(alias)
    raise ModelNotFound(f"unknown model {name!r}; available models: {sorted(service.models)} (seed inputs) and "
                        f"{names} (the Triton repository's raw-noise inputs)")


@router.get("/v2", response_model=V2ServerMetadata, responses=_ERR)
async def server_metadata(request: Request) -> V2ServerMetadata:
    """Server metadata: name, version, supported protocol extensions."""
    return V2ServerMetadata(name="quickstep", version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=_ERR)
async def model_metadata(name: str, service: ServiceDep) -> V2ModelMetadata:
    """Model metadata: inputs seed INT64 [-1], class_label INT64 [-1] (conditional models), steps INT32 [1] (both
    optional); output images UINT8 [-1, H, W, C].  NAME_{k}step: noise FP32 [-1, C, H, W] (noise2 for 2 steps),
    class_labels INT64 [-1, 1], as the Triton repository of `quickstep-export triton`."""
    m = resolve(service, name)
    return V2ModelMetadata(name=m.name, versions=["1"], platform=f"quickstep_{m.rt.backend.name}",
                           inputs=list(m.inputs().values()), outputs=[m.output()])


@router.get("/v2/models/{name}/ready", response_model=V2ModelReady, responses=_ERR)
async def model_ready(name: str, service: ServiceDep) -> JSONResponse:
    """200 when the model is loaded and warmed, else 503."""
    m = resolve(service, name)
    return JSONResponse({"name": m.name, "ready": m.rt.ready}, status_code=200 if m.rt.ready else 503)


# ----------------------------------------------------------------------------------------------- inference
def _split_body(request: Request, raw: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tail): the binary-data extension's Inference-Header-Content-Length, else all JSON."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    if media not in ("", "application/json", "application/octet-stream") and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {ctype[:60]!r} is not accepted: send application/json (or "
                                   "application/octet-stream with the binary-data extension's "
                                   f"{HEADER_LENGTH} header)")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted: send the request "
                                   "uncompressed (tritonclient: no request_compression_algorithm)")
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        return raw, b""
    if not length.strip().isdigit() or not 0 < int(length) <= len(raw):
        raise InvalidRequest(f"{HEADER_LENGTH}: must be the byte length of the JSON header, an integer from 1 to "
                             f"the body's {len(raw)} bytes; got {length[:40]!r}")
    return raw[:int(length)], raw[int(length):]


def _parse(header: bytes) -> V2InferRequest:
    try:
        return V2InferRequest.model_validate_json(header)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ())) or "body"
            if err.get("type") == "json_invalid":
                parts.append(f"body: not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
            else:
                parts.append(f"{where}: {err.get('msg')}")
        raise InvalidRequest("inference request: " + "; ".join(parts) + " (expected {\"inputs\": [{\"name\", "
                             "\"shape\", \"datatype\", \"data\"}], \"outputs\"?: [{\"name\": \"images\"}]})") from None


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _json_values(name: str, datatype: str, flat: list[Any]) -> np.ndarray:
    if datatype.startswith("FP"):
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat):
            raise InvalidRequest(f"input {name!r}: {datatype} data must be numbers")
        return np.asarray(flat, np.float64)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise InvalidRequest(f"input {name!r}: {datatype} data must be integers")
    info = np.iinfo(DTYPES[datatype])
    if any(not info.min <= x <= info.max for x in flat):
        raise InvalidRequest(f"input {name!r}: a value is out of the {datatype} range")
    return np.asarray(flat, np.int64)


def _tensors(req: V2InferRequest, tail: bytes, m: V2Model) -> dict[str, np.ndarray]:
    """Decode and check every input against the model's metadata (names, datatypes, sizes): integers as int64,
    floats as float32."""
    spec = m.inputs()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for t in req.inputs:
        if t.name not in spec:
            raise InvalidRequest(f"input {t.name!r}: model {m.name!r} has no such input; inputs: {', '.join(spec)}")
        if t.name in out:
            raise InvalidRequest(f"input {t.name!r}: given twice")
        want = spec[t.name]
        if t.datatype != want.datatype:
            raise InvalidRequest(f"input {t.name!r}: datatype {t.datatype} is not accepted; expected {want.datatype}")
        if any(d < 0 for d in t.shape):
            raise InvalidRequest(f"input {t.name!r}: shape {t.shape} has a negative dimension")
        count = int(np.prod(t.shape)) if t.shape else 1
        dtype = np.dtype(DTYPES[t.datatype]).newbyteorder("<")
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if t.data is not None:
                raise InvalidRequest(f"input {t.name!r}: both data and parameters.binary_data_size are given")
            if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
                raise InvalidRequest(f"input {t.name!r}: binary_data_size {size!r} does not match shape {t.shape} of "
                                     f"{t.datatype} ({count * dtype.itemsize} bytes)")
            if offset + size > len(tail):
                raise InvalidRequest(f"input {t.name!r}: the body holds {len(tail) - offset} binary bytes after the "
                                     f"JSON header, {size} expected")
            arr = np.frombuffer(tail, dtype, count, offset)
            offset += size
        else:
            if t.data is None:
                raise InvalidRequest(f"input {t.name!r}: no data (give \"data\" or the binary-data extension's "
                                     "parameters.binary_data_size)")
            flat = _flatten(t.data)
            if len(flat) != count:
                raise InvalidRequest(f"input {t.name!r}: shape {t.shape} holds {count} elements, data has {len(flat)}")
            arr = _json_values(t.name, t.datatype, flat)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidRequest(f"input {t.name!r}: values must be finite")
        out[t.name] = (arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64)).reshape(t.shape)
    if offset != len(tail):
        raise InvalidRequest(f"the body has {len(tail) - offset} bytes after the JSON header and the inputs' binary "
                             "data; binary_data_size of the inputs must add up to the rest of the body")
    return out


def _column(tensors: dict[str, np.ndarray], name: str, max_n: int) -> np.ndarray:
    """A per-image scalar input: [B] or [B, 1] -> [B]."""
    a = tensors[name]
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.shape[0] == 0:
        raise InvalidRequest(f"input {name!r}: shape {list(tensors[name].shape)} is not [B] (or [B, 1]) with "
                             f"B from 1 to {max_n}")
    return a


def _batch(tensors: dict[str, np.ndarray], m: V2Model, max_n: int) -> tuple[np.ndarray, np.ndarray | None,
                                                                            int | None]:
    """seed [B] (or [B, 1]), class_label like seed, steps [1] -> (seeds, labels, steps)."""
    if "seed" not in tensors:
        raise InvalidRequest(f"input 'seed' (INT64 [B]) is required: one seed per image; model {m.name!r} inputs: "
                             f"{', '.join(m.inputs())}")

    def column(name: str) -> np.ndarray:
        return _column(tensors, name, max_n)

    seeds = column("seed")
    if (seeds < 0).any() or (seeds > MAX_SEED).any():
        raise InvalidRequest(f"input 'seed': seeds must be from 0 to {MAX_SEED}")
    labels = None
    if "class_label" in tensors:
        labels = column("class_label")
        if labels.shape != seeds.shape:
            raise InvalidRequest(f"input 'class_label': {labels.shape[0]} labels for {seeds.shape[0]} seeds; give "
                                 "one per seed (or none: drawn from each seed)")
    steps = None
    if "steps" in tensors:
        s = tensors["steps"]
        if s.size != 1:
            raise InvalidRequest(f"input 'steps': shape {list(s.shape)} is not [1]")
        steps = int(s.reshape(-1)[0])
    return seeds, labels, steps


def _options(req: V2InferRequest, max_timeout_ms: int) -> tuple[bool, float | None]:
    """(binary output?, deadline from parameters.timeout in microseconds)."""
    params = dict(req.parameters or {})
    binary = params.pop("binary_data_output", False)
    timeout_us = params.pop("timeout", None)
    if params:
        raise InvalidRequest(f"parameters: {sorted(params)} not supported; allowed: binary_data_output, timeout")
    if not isinstance(binary, bool):
        raise InvalidRequest("parameters.binary_data_output must be true or false")
    for o in req.outputs or []:
        if o.name != OUTPUT:
            raise InvalidRequest(f"output {o.name!r}: the model has one output, {OUTPUT!r}")
        p = dict(o.parameters or {})
        b = p.pop("binary_data", False)
        if p or not isinstance(b, bool):
            raise InvalidRequest(f"output {o.name!r}: parameters may only be binary_data (true or false)")
        binary = b
    deadline = None
    if timeout_us is not None:
        if (not isinstance(timeout_us, int) or isinstance(timeout_us, bool)
                or not 1 <= timeout_us <= max_timeout_ms * 1000):
            raise InvalidRequest(f"parameters.timeout: must be an integer number of microseconds from 1 to "
                                 f"{max_timeout_ms * 1000} (this server's timeout), got {timeout_us!r}")
        deadline = timeout_us / 1e6
    return binary, deadline


def _raw_batch(tensors: dict[str, np.ndarray], m: V2Model, max_n: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The Triton-layout inputs: every noise tensor [B, C, H, W] (all of them), class_labels [B] or [B, 1]."""
    spec = m.inputs()
    missing = [n for n in spec if n not in tensors]
    if missing:
        raise InvalidRequest(f"inputs {missing} are required; model {m.name!r} inputs: "
                             + ", ".join(f"{t.name} {t.datatype} {t.shape}" for t in spec.values()))
    g = m.rt.bundle.graphs[m.graph_steps]  # type: ignore[index]
    chw = list(m.rt.bundle.image_shape)
    noises = [tensors[n] for n in g.noise_inputs]
    batch = noises[0].shape[0] if noises[0].ndim == 4 else 0
    for n, a in zip(g.noise_inputs, noises, strict=True):
        if a.ndim != 4 or list(a.shape[1:]) != chw or a.shape[0] != batch or not 1 <= batch <= max_n:
            raise InvalidRequest(f"input {n!r}: shape {list(a.shape)} is not [B, {', '.join(map(str, chw))}] with "
                                 f"one B from 1 to {max_n} for every input")
    labels = None
    if g.has_labels:
        labels = _column(tensors, "class_labels", max_n)
        if labels.shape[0] != batch:
            raise InvalidRequest(f"input 'class_labels': {labels.shape[0]} labels for a batch of {batch}")
    return noises, labels


async def infer(service: GenerationService, name: str, request: Request, raw: bytes, max_timeout_ms: int,
                timeout_s: float | None) -> Response:
    m = resolve(service, name)
    header, tail = _split_body(request, raw)
    req = _parse(header)
    binary, deadline = _options(req, max_timeout_ms)
    tensors = _tensors(req, tail, m)
    if deadline is not None:
        timeout_s = deadline if timeout_s is None else min(timeout_s, deadline)
    async with disconnect_watch(request) as gone:
        if m.graph_steps is None:
            seeds, labels, steps = _batch(tensors, m, service.max_n())
            res = await service.generate_seeds(m.rt.name, seeds, labels, steps, timeout_s=timeout_s,
                                               disconnected=gone.is_set)
        else:
            noises, labels = _raw_batch(tensors, m, service.max_n())
            res = await service.generate_noise(m.rt.name, m.graph_steps, noises, labels, timeout_s=timeout_s,
                                               disconnected=gone.is_set)
    images = res.images
    out: dict[str, Any] = {"name": OUTPUT, "datatype": "UINT8", "shape": list(images.shape)}
    body: dict[str, Any] = {"model_name": m.name, "model_version": "1"}
    if req.id is not None:
        body["id"] = req.id
    body["parameters"] = {"steps": res.steps}
    body["outputs"] = [out]
    if binary:
        data = np.ascontiguousarray(images).tobytes()
        out["parameters"] = {"binary_data_size": len(data)}
        head = json.dumps(body, separators=(",", ":")).encode()
        return Response(head + data, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(head))})
    out["data"] = images.reshape(-1).tolist()
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(V2InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/v2/models/{name}/infer", response_model=V2InferResponse, responses=_ERR, openapi_extra=INFER_BODY)
async def model_infer(name: str, request: Request, service: ServiceDep, settings: SettingsDep,
                      timeout_s: TimeoutDep) -> Response:
    """Inference: inputs seed INT64 [B], class_label INT64 [B] (optional), steps INT32 [1] (optional); output
    images UINT8 [B, H, W, C], as JSON `data` or, with `binary_data` / `binary_data_output` (and the
    Inference-Header-Content-Length header for binary inputs), as raw bytes after the JSON header."""
    return await infer(service, name, request, await request.body(), settings.max_timeout_ms, timeout_s)


# ----------------------------------------------------------------------------------------------- versions
def _version(name: str, version: str) -> None:
    """Every model has one version, "1" (what tritonclient's model_version="1" asks for)."""
    if version != "1":
        raise ModelNotFound(f"model {name!r} has no version {version[:40]!r}; its only version is '1'")


@router.get("/v2/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=_ERR)
async def model_version_metadata(name: str, version: str, service: ServiceDep) -> V2ModelMetadata:
    """Model metadata of version 1 (the only one)."""
    _version(name, version)
    return await model_metadata(name, service)


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=V2ModelReady, responses=_ERR)
async def model_version_ready(name: str, version: str, service: ServiceDep) -> JSONResponse:
    """Readiness of version 1 (the only one)."""
    _version(name, version)
    return await model_ready(name, service)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=_ERR,
             openapi_extra=INFER_BODY)
async def model_version_infer(name: str, version: str, request: Request, service: ServiceDep, settings: SettingsDep,
                              timeout_s: TimeoutDep) -> Response:
    """Inference on version 1 (the only one); as POST /v2/models/{name}/infer."""
    _version(name, version)
    return await infer(service, name, request, await request.body(), settings.max_timeout_ms, timeout_s)

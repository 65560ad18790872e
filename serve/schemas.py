"""The HTTP contract's request/response models (DESIGN.md "Serving contract").

Shared by the server and the client: this module imports pydantic only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1
ImageFormat = Literal["png", "jpeg", "webp"]


class GenerateRequest(BaseModel):
    """POST /v1/generate body."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name; the server's default model when omitted.")
    n: int = Field(1, ge=1, description="Number of images (at most the server's per-request limit).")
    steps: int | None = Field(None, ge=1, description="Sampling steps; the model's default when omitted.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed; a random one is drawn and returned when omitted.")
    class_label: int | None = Field(None, ge=0, description="Class for class-conditional models.")
    format: ImageFormat = Field("png", description="Image encoding.")
    scale: int = Field(1, ge=1, le=16, description="Nearest-neighbour upscale factor for tiny images.")

    @field_validator("n", "steps", "seed", "class_label", "scale", mode="before")
    @classmethod
    def _json_integer(cls, v: Any) -> Any:
        """Integers must be integers: no true/false, no "3" (pydantic's lax mode would coerce both)."""
        if isinstance(v, bool | str | bytes):
            raise ValueError(f"must be an integer, not {'a boolean' if isinstance(v, bool) else 'a string'}")
        return v


class ImageOut(BaseModel):
    index: int
    b64: str
    mime: str
    class_label: int | None = Field(None, description="Class the image was generated for (conditional models).")


class GenerateResponse(BaseModel):
    model: str
    steps: int
    seed: int
    latency_ms: float
    images: list[ImageOut]


class DeviceInfo(BaseModel):
    """Where a model runs: backend, device kind and (onnxruntime) execution provider."""

    backend: str
    kind: Literal["cpu", "cuda"]
    provider: str | None = None


class ModelInfo(BaseModel):
    id: str = Field(description="The model name (OpenAI's Model.id).")
    object: Literal["model"] = "model"
    created: int = Field(0, description="Unix time the bundle was exported (0 when unknown).")
    owned_by: str = "quickstep"
    name: str
    kind: Literal["consistency", "diffusion"]
    backend: str = Field(description="Display form of `device`, e.g. 'onnxruntime (CPUExecutionProvider)'.")
    device: DeviceInfo | None = None
    image_shape: list[int]
    num_classes: int
    steps_supported: list[int]
    default_steps: int
    max_batch: int
    ready: bool
    class_names: list[str] | None = Field(None, description="Class names (index-aligned) a prompt may name.")
    class_aliases: dict[str, int] = Field(default_factory=dict, description="Extra prompt words -> class index.")
    sizes: list[str] = Field(default_factory=list, description="Image sizes POST /v1/images/generations accepts "
                             "('WxH': the native resolution and its integer upscales).")
    quality: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _id_from_name(cls, v: Any) -> Any:
        """Servers before the OpenAI-compatible fields sent no `id`: it is the name."""
        if isinstance(v, dict) and "id" not in v and "name" in v:
            return {**v, "id": v["name"]}
        return v


class ModelList(BaseModel):
    """Quickstep's `models` list, and the same list as OpenAI's {object: "list", data} for `client.models.list()`."""

    object: Literal["list"] = "list"
    data: list[ModelInfo] = Field(default_factory=list)
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    models: dict[str, bool] = Field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- OpenAI images API
class ImagesGenerateRequest(BaseModel):
    """POST /v1/images/generations body: OpenAI's fields plus Quickstep's `steps`, `seed`, `class_label`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id from GET /v1/models; the default model when omitted.")
    prompt: str = Field("", max_length=4000, description="Names one class of the model (class_names or "
                        "class_aliases, as a whole word); '' draws a class at random from the seed. Ignored by "
                        "unconditional models.")
    n: int = Field(1, ge=1, description="Number of images (at most the server's per-request limit).")
    size: str | None = Field(None, max_length=32, description="'WxH': the native resolution or an integer upscale "
                             "of it (GET /v1/models: sizes); 'auto' or omitted = native.")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="Only 'b64_json': this server does not host images for 'url'.")
    output_format: ImageFormat = Field("png", description="Image encoding of b64_json.")
    user: str | None = Field(None, max_length=256, description="End-user id (accepted, not used).")
    steps: int | None = Field(None, ge=1, description="Quickstep: sampling steps; the model's default when omitted.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Quickstep: seed; random (and returned) when "
                             "omitted. Image k uses the same noise as /v1/generate's image k.")
    class_label: int | None = Field(None, ge=0, description="Quickstep: class index; overrides the prompt.")

    @field_validator("n", "steps", "seed", "class_label", mode="before")
    @classmethod
    def _json_integer(cls, v: Any) -> Any:
        return GenerateRequest._json_integer(v)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = Field(None, description="The class the image was generated for, by name.")
    class_label: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: ImageFormat = "png"
    size: str
    model: str
    steps: int
    seed: int


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# ----------------------------------------------------------------------------------------------- Open Inference Protocol v2
V2Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                     "FP32", "FP64", "BYTES", "BF16"]


class V2Tensor(BaseModel):
    """One input tensor of an inference request: data as a flat (or nested) JSON array, or raw bytes after the
    JSON header (binary-data extension: parameters.binary_data_size)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    datatype: V2Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """POST /v2/models/{name}/infer (the JSON part)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(max_length=16)
    outputs: list[V2RequestedOutput] | None = Field(None, max_length=16)


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: V2Datatype
    parameters: dict[str, Any] | None = None
    data: list[int] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2OutputTensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: V2Datatype
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str

"""The HTTP contract's request/response models (DESIGN.md "Serving contract").

Shared by the server and the client: this module imports pydantic only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class ModelInfo(BaseModel):
    name: str
    kind: Literal["consistency", "diffusion"]
    backend: str
    image_shape: list[int]
    num_classes: int
    class_names: list[str] | None = None  # index-aligned, when the training data named its classes
    steps_supported: list[int]
    default_steps: int
    max_batch: int
    ready: bool
    quality: dict[str, Any] | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    models: dict[str, bool] = Field(default_factory=dict)

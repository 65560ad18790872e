"""Server settings: every option of `quickstep-serve` also comes from the environment (QUICKSTEP_*)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["onnxruntime", "tensorrt", "torch", "aoti"]
DeviceName = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def _split_list(v: object) -> object:
    """'a,b' or '["a","b"]' (environment) or a list (code) -> list."""
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return []
        if s.startswith("["):
            import json

            return json.loads(s)
        return [p.strip() for p in s.split(",") if p.strip()]
    return v


class ServeSettings(BaseSettings):
    """Configuration of one server process (CLI flags override QUICKSTEP_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="QUICKSTEP_", extra="ignore", frozen=True)

    # models
    bundle: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Bundle directories to serve (QUICKSTEP_BUNDLE='a,b').")
    models_dir: Path | None = Field(None, description="Serve every bundle (sub-directory with manifest.json) here.")
    default_model: str | None = Field(None, description="Model used when a request names none (first loaded).")
    backend: BackendName = "onnxruntime"
    device: DeviceName = Field("auto", description="auto = CUDA when the backend can really use it, else CPU.")
    verify_sha256: bool = Field(True, description="Check every bundle file against the manifest's sha256.")
    force: bool = Field(False, description="Serve a bundle even when its quality report flags the chosen backend.")
    # backend tuning
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0 = runtime default).")
    intra_op_spinning: bool = Field(False, description="Let onnxruntime's idle intra-op threads spin (burns CPU).")
    ort_tensorrt: bool = Field(False, description="Put onnxruntime's TensorRT provider ahead of CUDA "
                               "(QUICKSTEP_ORT_TENSORRT=1, --ort-tensorrt).")
    ort_trt_cache_dir: Path | None = Field(
        None, description="Root of the onnxruntime TensorRT provider's engine/timing caches, one sub-directory per "
        "bundle (sha of its manifest); default $XDG_CACHE_HOME/quickstep/ort-trt (~/.cache/...). Never the bundle "
        "itself: bundles stay read-only and verifiable.")
    torch_compile: bool = Field(False, description="torch backend: torch.compile the generator.")
    torch_compile_mode: CompileMode = Field(
        "default", description="torch.compile mode: reduce-overhead = CUDA graphs, max-autotune = + kernel search.")
    torch_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="torch backend: weights dtype (bfloat16 = no autocast re-casting every call).")
    torch_channels_last: bool = Field(False, description="torch backend: channels_last (NHWC) activations.")
    batch_buckets: Literal["auto", "on", "off"] = Field(
        "auto", description="torch/aoti: pad each micro-batch to a bucket 1, 2, 4, ..., max_batch and warm every "
        "bucket before ready; auto = on with --torch-compile (one static graph per bucket).")
    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # batching
    max_batch: int = Field(32, ge=1, le=4096, description="Most images merged into one backend run.")
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0, description="Longest wait to fill a batch.")
    max_queue: int = Field(256, ge=1, description="Most requests waiting per model; beyond it 429.")
    max_images_per_request: int = Field(16, ge=1, description="Upper bound of `n` in one request.")
    timeout_s: float = Field(30.0, gt=0.0, description="Per-request deadline (504 beyond it).")
    shutdown_timeout_s: float = Field(30.0, ge=0.0, description="Grace period for in-flight work on shutdown.")
    # security
    api_key_file: Path | None = Field(None, description="File with one API key per line ('#' comments).")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys (QUICKSTEP_API_KEYS='k1,k2'); never logged.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body (413 beyond).")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="CORS is off when empty.")
    # UI
    ui: bool = Field(True, description="Mount the Gradio demo at /ui.")
    # test hook: extra seconds the warm-up sleeps before readiness flips (observing 503 before ready)
    warmup_delay_s: float = Field(0.0, ge=0.0)

    @field_validator("bundle", "cors_origins", "api_keys", mode="before")
    @classmethod
    def _lists(cls, v: object) -> object:
        return _split_list(v)

    @property
    def max_timeout_ms(self) -> int:
        """The largest deadline a client may ask for (X-Timeout-Ms), in whole milliseconds."""
        return max(1, int(self.timeout_s * 1000))

    def ort_trt_cache_root(self) -> Path:
        """ort_trt_cache_dir, else $XDG_CACHE_HOME/quickstep/ort-trt (~/.cache/quickstep/ort-trt)."""
        if self.ort_trt_cache_dir is not None:
            return Path(self.ort_trt_cache_dir).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        return base / "quickstep" / "ort-trt"

    def resolved_api_keys(self) -> list[str]:
        """Keys from QUICKSTEP_API_KEYS / api_keys and from api_key_file (read at start-up)."""
        keys = [k.get_secret_value() for k in self.api_keys if k.get_secret_value()]
        if self.api_key_file is not None:
            try:
                text = Path(self.api_key_file).read_text()
            except OSError as e:
                raise ValueError(f"cannot read api_key_file {str(self.api_key_file)!r}: {e.strerror}") from e
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys

"""`quickstep-serve`: serve bundles over HTTP (every flag also from QUICKSTEP_* environment variables)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import typer
from pydantic import ValidationError

from quickstep.cli import run_app

EXIT_USAGE = 2


app = typer.Typer(name="quickstep-serve", add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


class BackendName(StrEnum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"
    aoti = "aoti"


class DeviceName(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class CompileMode(StrEnum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class TorchDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Buckets(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class LogLevel(StrEnum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


@app.command(help="Serve Quickstep bundles: POST /v1/generate, /v1/models, /health/*, /metrics, /docs, /ui. Every "
                  "option can also be set as QUICKSTEP_<OPTION> (e.g. QUICKSTEP_MAX_BATCH=64); flags win over the "
                  "environment. With no --bundle/--models-dir the bundled default model is served.")
def serve(
    bundle: list[str] | None = typer.Option(None, "--bundle", metavar="DIR", help="bundle directory (repeatable)"),
    models_dir: str | None = typer.Option(None, "--models-dir", metavar="DIR", help="serve every bundle found in DIR"),
    default_model: str | None = typer.Option(None, "--default-model", metavar="NAME",
                                             help="model used when a request names none"),
    backend: BackendName | None = typer.Option(None, "--backend", help="inference backend (onnxruntime)"),
    device: DeviceName | None = typer.Option(None, "--device", help="device (auto: CUDA when the backend can use it)"),
    host: str | None = typer.Option(None, "--host", help="bind address (127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", help="port (8000)"),
    max_batch: int | None = typer.Option(None, "--max-batch", help="most images per backend run (32)"),
    max_wait_ms: float | None = typer.Option(None, "--max-wait-ms", help="longest wait to fill a batch (5)"),
    max_queue: int | None = typer.Option(None, "--max-queue", help="most queued requests per model before 429 (256)"),
    max_images_per_request: int | None = typer.Option(None, "--max-images-per-request", help="upper bound of n (16)"),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="per-request deadline, 504 beyond it (30)"),
    api_key_file: str | None = typer.Option(None, "--api-key-file", metavar="FILE",
                                            help="file with one API key per line (or QUICKSTEP_API_KEYS=k1,k2)"),
    max_body_bytes: int | None = typer.Option(None, "--max-body-bytes", help="largest request body, 413 beyond it "
                                                                             "(1 MiB)"),
    cors_origins: list[str] | None = typer.Option(None, "--cors-origin", metavar="ORIGIN",
                                                  help="allowed CORS origin (repeatable)"),
    intra_op_threads: int | None = typer.Option(None, "--intra-op-threads",
                                                help="onnxruntime intra-op threads (0 = default)"),
    ort_tensorrt: bool = typer.Option(False, "--ort-tensorrt", help="onnxruntime: put the TensorRT execution "
                                                                    "provider ahead of CUDA when it is installed"),
    ort_trt_cache_dir: str | None = typer.Option(None, "--ort-trt-cache-dir", metavar="DIR",
                                                 help="onnxruntime TensorRT provider engine cache root (default "
                                                      "$XDG_CACHE_HOME/quickstep/ort-trt)"),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="torch backend: torch.compile the generators"),
    torch_compile_mode: CompileMode | None = typer.Option(
        None, "--torch-compile-mode", help="torch.compile mode (default; reduce-overhead = CUDA graphs)"),
    torch_dtype: TorchDtype | None = typer.Option(None, "--torch-dtype", help="torch backend: weights dtype (float32)"),
    torch_channels_last: bool = typer.Option(False, "--torch-channels-last",
                                             help="torch backend: channels_last activations"),
    batch_buckets: Buckets | None = typer.Option(
        None, "--batch-buckets", help="torch/aoti: pad micro-batches to buckets 1,2,4..max-batch, all warmed before "
                                      "ready (auto: with compile)"),
    no_ui: bool = typer.Option(False, "--no-ui", help="do not mount the Gradio demo at /ui"),
    force: bool = typer.Option(False, "--force", help="serve a bundle even when its quality report "
                                                      "(quickstep-export report) flags the chosen backend"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip sha256 checks of bundles"),
    log_level: LogLevel | None = typer.Option(None, "--log-level", help="log level (info)"),
) -> None:
    raise typer.Exit(run(_overrides(dict(locals()))))


_SWITCHES = {"ort_tensorrt": ("ort_tensorrt", True), "torch_compile": ("torch_compile", True),
             "torch_channels_last": ("torch_channels_last", True),
             "force": ("force", True), "no_ui": ("ui", False), "no_verify": ("verify_sha256", False)}


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    """ServeSettings overrides from parsed flags: only what the command line gives wins over the environment
    (absent options and unset switches leave QUICKSTEP_* in charge)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k in _SWITCHES:
            if v:
                out[_SWITCHES[k][0]] = _SWITCHES[k][1]
        elif v is not None and v != [] and v != ():
            out[k] = v.value if isinstance(v, StrEnum) else (list(v) if isinstance(v, tuple) else v)
    return out


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """The ServeSettings overrides a command line gives (parsed, not run)."""
    return _overrides(typer.main.get_command(app).make_context("quickstep-serve", list(argv)).params)


def _fail(msg: str) -> int:
    print(f"quickstep-serve: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags over the environment, build the app (bundles verified first), run uvicorn; the exit status."""
    return run_app(app, argv, "quickstep-serve")


def run(overrides: dict[str, Any]) -> int:
    """Settings = `overrides` over QUICKSTEP_* environment; build the app and serve it with uvicorn."""
    from .bundle import BundleError
    from .settings import ServeSettings

    try:
        settings = ServeSettings(**overrides)
        settings.resolved_api_keys()
    except ValidationError as e:
        return _fail("; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()))
    except ValueError as e:
        return _fail(str(e))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import create_app
    from .backends.base import BackendError

    try:
        app = create_app(settings)
    except (BundleError, BackendError) as e:
        return _fail(str(e))
    except (ValueError, RuntimeError) as e:
        return _fail(str(e))
    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`quickstep-serve`: serve bundles over HTTP (every flag also from QUICKSTEP_* environment variables)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quickstep-serve",
        description="Serve Quickstep bundles: POST /v1/generate, /v1/models, /health/*, /metrics, /docs, /ui. "
                    "Every option can also be set as QUICKSTEP_<OPTION> (e.g. QUICKSTEP_MAX_BATCH=64); "
                    "flags win over the environment. With no --bundle/--models-dir the bundled default model is "
                    "served.")
    a = p.add_argument
    a("--bundle", action="append", metavar="DIR", help="bundle directory (repeatable)")
    a("--models-dir", metavar="DIR", help="serve every bundle found in DIR")
    a("--default-model", metavar="NAME", help="model used when a request names none")
    a("--backend", choices=["onnxruntime", "tensorrt", "torch", "aoti"], help="inference backend (onnxruntime)")
    a("--device", choices=["auto", "cpu", "cuda"], help="device (auto: CUDA when the backend can use it)")
    a("--host", help="bind address (127.0.0.1)")
    a("--port", type=int, help="port (8000)")
    a("--max-batch", type=int, help="most images per backend run (32)")
    a("--max-wait-ms", type=float, help="longest wait to fill a batch (5)")
    a("--max-queue", type=int, help="most queued requests per model before 429 (256)")
    a("--max-images-per-request", type=int, help="upper bound of n (16)")
    a("--timeout-s", type=float, help="per-request deadline, 504 beyond it (30)")
    a("--api-key-file", metavar="FILE", help="file with one API key per line (or QUICKSTEP_API_KEYS=k1,k2)")
    a("--max-body-bytes", type=int, help="largest request body, 413 beyond it (1 MiB)")
    a("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN", help="allowed CORS origin (repeatable)")
    a("--intra-op-threads", type=int, help="onnxruntime intra-op threads (0 = default)")
    a("--ort-tensorrt", action="store_true", default=None,
      help="onnxruntime: put the TensorRT execution provider ahead of CUDA when it is installed")
    a("--ort-trt-cache-dir", metavar="DIR",
      help="onnxruntime TensorRT provider engine cache root (default $XDG_CACHE_HOME/quickstep/ort-trt)")
    a("--torch-compile", action="store_true", default=None, help="torch backend: torch.compile the generators")
    a("--torch-compile-mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
      help="torch.compile mode (default; reduce-overhead = CUDA graphs)")
    a("--torch-dtype", choices=["float32", "bfloat16"], help="torch backend: weights dtype (float32)")
    a("--torch-channels-last", action="store_true", default=None, help="torch backend: channels_last activations")
    a("--batch-buckets", choices=["auto", "on", "off"],
      help="torch/aoti: pad micro-batches to buckets 1,2,4..max-batch, all warmed before ready (auto: with compile)")
    a("--no-ui", action="store_false", dest="ui", default=None, help="do not mount the Gradio demo at /ui")
    a("--force", action="store_true", default=None,
      help="serve a bundle even when its quality report (quickstep-export report) flags the chosen backend")
    a("--no-verify", action="store_false", dest="verify_sha256", default=None, help="skip sha256 checks of bundles")
    a("--log-level", choices=["critical", "error", "warning", "info", "debug"], help="log level (info)")
    return p


def _fail(msg: str) -> int:
    print(f"quickstep-serve: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags over the environment, build the app (bundles verified first), run uvicorn."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
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

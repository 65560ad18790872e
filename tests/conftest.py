"""Suite-wide pytest setup: marker-based skips, environment, shared fixtures.

Shared helpers live in tests/helpers.py; import them with `from tests.helpers import ...`
(`from helpers import ...` works too: this file puts tests/ on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA and `trt` tests without TensorRT (when selected explicitly with -m)."""
    cuda = trt = None
    for item in items:
        if "gpu" in item.keywords:
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)"))
        if "trt" in item.keywords:
            trt = _has_tensorrt() if trt is None else trt
            if not trt:
                item.add_marker(pytest.mark.skip(reason="needs TensorRT (the 'gpu' extra; `import tensorrt` failed)"))


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers started by a test)."""
    from tests.helpers import free_port as _free_port  # imported lazily: helpers imports torch

    return _free_port()

"""Where a backend runs, as a value: backend, device kind and (onnxruntime) execution provider.

The quality gate compares these, not display strings; `str(device)` is the display form recorded in bundle quality
reports ('onnxruntime (CUDAExecutionProvider)', 'torch (cpu)') and `Device.parse` reads it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

DeviceKind = Literal["cpu", "cuda"]
_PROVIDER_KIND: dict[str, DeviceKind] = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                                         "TensorrtExecutionProvider": "cuda"}
_CANONICAL = {p.lower(): p for p in _PROVIDER_KIND}
_DISPLAY = re.compile(r"^\s*([\w.-]+)\s*\(\s*([^()]*?)\s*\)\s*$")


@dataclass(frozen=True)
class Device:
    """backend name, device kind, and the onnxruntime execution provider when there is one."""

    backend: str
    kind: DeviceKind
    provider: str | None = None

    def __str__(self) -> str:
        return f"{self.backend} ({self.provider or self.kind})"

    @classmethod
    def of_provider(cls, backend: str, provider: str) -> Device:
        """An onnxruntime device from its execution provider name (unknown providers count as CPU)."""
        p = _CANONICAL.get(provider.lower(), provider)
        return cls(backend, _PROVIDER_KIND.get(p, "cpu"), p)

    @classmethod
    def parse(cls, text: str) -> Device:
        """The display form back into a Device: 'torch (cuda)', 'onnxruntime (CPUExecutionProvider)'; ValueError
        when `text` is neither."""
        m = _DISPLAY.match(str(text))
        if m is None:
            raise ValueError(f"not a device description: {text!r} (expected 'backend (cpu|cuda|<Provider>)')")
        backend, inner = m.group(1).lower(), m.group(2)
        if inner.lower() in ("cpu", "cuda"):
            return cls(backend, inner.lower())  # type: ignore[arg-type]
        return cls.of_provider(backend, inner)

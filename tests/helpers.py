"""Shared test helpers.

Import them as `from tests.helpers import free_port, tiny_unet_config, tiny_checkpoint`
(tests/ is a package and the repo root is on sys.path under pytest; `from helpers import ...` also works
because tests/conftest.py appends tests/ to sys.path).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from quickstep.train.core import ModelConfig, TrigFlowModel, UNetConfig, build_model
from quickstep.train.core.checkpoint import save_checkpoint

TINY_RESOLUTION = 8


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_unet_config(num_classes: int = 0) -> ModelConfig:
    """A very small UNet for 1x8x8 images: 8 channels, mult (1, 2), attention at 4x4 (~46k params with 10 classes)."""
    return ModelConfig(
        backbone=UNetConfig(
            img_channels=1,
            img_resolution=TINY_RESOLUTION,
            model_channels=8,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(4,),
            num_heads=1,
            num_classes=num_classes,
        ),
        sigma_data=0.5,
        logvar_channels=8,
    )


def perturb_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every all-zero parameter (the zero-initialised output layers) with small N(0, std^2) values,
    so the network's output depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def tiny_model(num_classes: int = 0, seed: int = 0) -> TrigFlowModel:
    """tiny_unet_config's model with seeded random, non-trivial weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):  # nn layers initialise from the global RNG; keep it untouched
        torch.manual_seed(seed)
        model = build_model(tiny_unet_config(num_classes))
    return perturb_zero_init(model, seed=seed).eval()


def tiny_checkpoint(tmp_path: str | Path, kind: str = "consistency", num_classes: int = 0, seed: int = 0) -> Path:
    """Build a tiny model with random non-zero weights, save it with save_checkpoint, return the directory.

    The EMA weights differ slightly from the raw ones (so tests can tell them apart);
    config.json carries `kind` ('consistency' | 'diffusion'), `name` and a `data` section.
    """
    if kind not in ("consistency", "diffusion"):
        raise ValueError(f"kind must be 'consistency' or 'diffusion', got {kind!r}")
    model = tiny_model(num_classes, seed)
    ema = tiny_model(num_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    path = Path(tmp_path) / f"tiny-{kind}{'-cond' if num_classes else ''}"
    extra = {
        "kind": kind,
        "name": path.name,
        "data": {"name": "tiny", "kind": "image", "shape": [1, TINY_RESOLUTION, TINY_RESOLUTION],
                 "num_classes": num_classes},
    }
    return save_checkpoint(path, model, ema=ema, extra_config=extra, state={"step": 0})


# ----------------------------------------------------------------------------------------------- server processes
class ServerProcess:
    """`quickstep-serve` as a real subprocess on 127.0.0.1 (its own pid, RSS, signals, captured log).

    `args` are extra CLI flags; `env` extra environment variables (e.g. QUICKSTEP_API_KEYS). stdout and stderr go
    to `log_path` (read it with `log()`); `stop()` sends SIGTERM, waits, then SIGKILLs if needed.
    """

    def __init__(self, bundles: list[str | Path], args: list[str] | None = None, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None, port: int | None = None):
        import os
        import subprocess
        import sys
        import tempfile

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "quickstep.serve.cli", "--host", "127.0.0.1", "--port", str(self.port),
               "--no-ui", "--log-level", "info"]
        for b in bundles:
            cmd += ["--bundle", str(b)]
        cmd += list(args or [])
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="quickstep-serve-", suffix=".log")[1])
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0, headers: dict[str, str] | None = None) -> ServerProcess:
        """Poll /health/ready until 200; RuntimeError (with the log tail) if the process exits or time runs out."""
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health/ready", headers=headers, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def rss_kb(self) -> int:
        """VmRSS of the server process (kB) from /proc/PID/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def signal(self, sig: int) -> None:
        import os

        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to `timeout`, SIGKILL if still alive; returns the exit code."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric_samples(url: str, headers: dict[str, str] | None = None) -> dict[str, list]:
    """GET url/metrics parsed with prometheus_client: sample name -> list of Sample(name, labels, value)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=10).text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def metric_total(samples: dict[str, list], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return float(sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())))

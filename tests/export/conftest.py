"""Shared bundles for the export tests: exported once per session from tiny checkpoints (tests/helpers.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import tiny_checkpoint


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription (8x faster here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def cm_ckpt(export_root: Path) -> Path:
    """A tiny class-conditional consistency checkpoint (1x8x8, 10 classes)."""
    return tiny_checkpoint(export_root / "ckpt", kind="consistency", num_classes=10)


@pytest.fixture(scope="session")
def cm_bundle(cm_ckpt: Path, export_root: Path) -> Path:
    """Its bundle: generator_1step.onnx, generator_2step.onnx, denoiser.onnx, weights, manifest."""
    from quickstep.export.bundle import export_bundle

    with one_torch_thread():
        return export_bundle(cm_ckpt, export_root / "bundles" / "cm", steps=(1, 2))


@pytest.fixture(scope="session")
def dm_ckpt(export_root: Path) -> Path:
    """A tiny unconditional diffusion checkpoint."""
    return tiny_checkpoint(export_root / "ckpt", kind="diffusion", num_classes=0)


@pytest.fixture(scope="session")
def dm_bundle(dm_ckpt: Path, export_root: Path) -> Path:
    """Its bundle with a 2-step Heun graph (3 NFE; the default 18 steps takes ~35 s to export)."""
    from quickstep.export.bundle import export_bundle

    with one_torch_thread():
        return export_bundle(dm_ckpt, export_root / "bundles" / "dm", heun_steps=(2,))


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every export test runs with one torch thread (session fixtures above enter it themselves)."""
    with one_torch_thread():
        yield

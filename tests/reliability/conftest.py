"""Reliability fixtures: one tiny exported bundle per session (the serve tests' `make_bundle`), shared by every
test here; servers come from tests.serve.conftest.serve (in-process thread) or tests.helpers.ServerProcess."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import make_bundle


@pytest.fixture(scope="session")
def rel_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unconditional 1x8x8 consistency bundle (steps 1 and 2, ONNX + torch weights). Read-only: copy it
    (`bundle_copy`) before damaging it."""
    return make_bundle(tmp_path_factory.mktemp("rel-bundle"))


@pytest.fixture
def bundle_copy(rel_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may corrupt."""
    return Path(shutil.copytree(rel_bundle, tmp_path / rel_bundle.name))

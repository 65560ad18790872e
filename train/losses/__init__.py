"""quickstep.train.losses: one objective per module, registered by name (see `base` for the protocol)."""

import importlib
import importlib.util

from . import cp, diffusion, fp, stf  # noqa: F401  (register the objectives)
from .base import (
    OBJECTIVES,
    Batch,
    Objective,
    StepContext,
    build_objective,
    get_objective_spec,
    register_objective,
)

# objectives owned by other modules register themselves when their module is present
for _name in ("scm", "direct_cm"):
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["OBJECTIVES", "Batch", "Objective", "StepContext", "build_objective", "get_objective_spec",
           "register_objective"]

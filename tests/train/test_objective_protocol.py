"""The objective protocol declares what the trainer needs to know (no getattr guessing): needs_teacher,
init_from_teacher and sampler; the kind the trainer records follows the declared sampler."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from quickstep.train.loop import objectives_kind
from quickstep.train.losses import OBJECTIVES, register_objective


def test_every_objective_declares_the_protocol():
    for name, spec in OBJECTIVES.items():
        assert isinstance(spec.needs_teacher, bool) and isinstance(spec.init_from_teacher, bool), name
        assert spec.sampler in ("heun", "consistency"), name
    kinds = {n: objectives_kind([OBJECTIVES[n].factory]) for n in OBJECTIVES}
    assert {n for n, k in kinds.items() if k == "consistency"} == {"sct", "scd", "direct_cm", "cd"}
    assert OBJECTIVES["scd"].needs_teacher and OBJECTIVES["scd"].init_from_teacher
    assert not OBJECTIVES["sct"].needs_teacher and not OBJECTIVES["diffusion"].init_from_teacher


def test_register_objective_fills_defaults_and_rejects_unknown_samplers():
    @dataclass
    class Cfg:
        weight: float = 1.0

    class Plain:
        def __init__(self, config):
            self.config = config

    class Weird(Plain):
        sampler = "ddim"

    try:
        register_objective("_test_plain", Cfg)(Plain)
        assert Plain.needs_teacher is False and Plain.init_from_teacher is False and Plain.sampler == "heun"
        with pytest.raises(ValueError, match="declares sampler 'ddim'"):
            register_objective("_test_weird", Cfg)(Weird)
    finally:
        OBJECTIVES.pop("_test_plain", None)
        OBJECTIVES.pop("_test_weird", None)

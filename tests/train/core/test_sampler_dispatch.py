"""Sampler dispatch once in core (`sampling.generate`, `generator.generator_module`) and k-diffusion style
per-step callbacks that observe a solve without changing it."""

from __future__ import annotations

import pytest
import torch
from quickstep.train.core.generator import ConsistencyGenerator, HeunGenerator, generator_module
from quickstep.train.core.sampling import (
    generate,
    heun_teacher_sample,
    karras_sigmas,
    sample_consistency,
    sample_euler,
    sample_heun,
    sample_sde,
)

from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_classes=10, seed=3)


def test_generate_is_the_samplers_with_the_noise_convention(model):
    g = torch.Generator().manual_seed(0)
    eps, eps2 = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    y = torch.tensor([1, 2, 3])
    sd = model.sigma_data
    torch.testing.assert_close(generate(model, "consistency", eps, 2, class_labels=y, extra_noise=[eps2]),
                               sample_consistency(model, sd * eps, steps=2, class_labels=y, extra_noise=[sd * eps2]),
                               rtol=0, atol=0)
    torch.testing.assert_close(generate(model, "heun", eps, 3, class_labels=y),
                               heun_teacher_sample(model, eps, num_steps=3, class_labels=y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'consistency' or 'heun'"):
        generate(model, "ddim", eps, 1)


def test_generator_module_dispatch(model):
    assert isinstance(generator_module(model, "consistency", 2), ConsistencyGenerator)
    h = generator_module(model, "diffusion", 4)
    assert isinstance(h, HeunGenerator) and h.num_steps == 4
    with pytest.raises(ValueError, match="kind must be"):
        generator_module(model, "gan", 1)


@pytest.mark.parametrize("solver", [sample_heun, sample_euler, sample_sde])
def test_callbacks_observe_every_step_without_changing_the_result(model, solver):
    sigmas = karras_sigmas(4)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    kw = {"generator": torch.Generator().manual_seed(5)} if solver is sample_sde else {}
    plain = solver(model.denoise, x, sigmas, **kw)
    seen = []
    kw = {"generator": torch.Generator().manual_seed(5)} if solver is sample_sde else {}
    out = solver(model.denoise, x, sigmas, callback=seen.append, **kw)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert [s["i"] for s in seen] == [0, 1, 2, 3] and seen[-1]["sigma_next"] == 0.0
    torch.testing.assert_close(seen[-1]["x"], out, rtol=0, atol=0)
    steps = []
    sample_consistency(model, 0.5 * x / sigmas[0], steps=2, generator=torch.Generator(), callback=steps.append)
    assert [s["i"] for s in steps] == [0, 1] and steps[1]["t"] == pytest.approx(1.1)

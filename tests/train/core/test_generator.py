"""Whole-sampler generator modules: N(0, I) noise in, uint8 NHWC images out, same math as the samplers."""

from __future__ import annotations

import torch
from quickstep.train.core.generator import ConsistencyGenerator, DenoiserGraph, HeunGenerator, to_uint8_nhwc
from quickstep.train.core.sampling import heun_teacher_sample, sample_consistency
from quickstep.train.core.trigflow import consistency_times

from tests.helpers import tiny_model


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_to_uint8_nhwc():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5]).reshape(1, 6, 1, 1)  # [B, C, H, W] with C = 6
    out = to_uint8_nhwc(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 1, 6)
    assert out.flatten().tolist() == [0, 0, 128, 255, 255, 191]
    img = torch.rand(2, 3, 4, 5) * 2 - 1
    assert to_uint8_nhwc(img).shape == (2, 4, 5, 3)
    torch.testing.assert_close(to_uint8_nhwc(img).permute(0, 3, 1, 2).float() / 127.5 - 1, img, atol=1 / 127.5, rtol=0)


def test_consistency_generator_one_step_equals_sampler():
    model = tiny_model(num_classes=10)
    eps = _noise(3, 1, 8, 8)
    labels = torch.tensor([0, 4, 9])
    gen = ConsistencyGenerator(model, steps=1).eval()
    with torch.no_grad():
        img = gen(eps, labels)
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8, 1)
    ref = to_uint8_nhwc(sample_consistency(model, eps * model.sigma_data, steps=1, class_labels=labels))
    assert torch.equal(img, ref)
    assert len(torch.unique(img)) > 5  # a non-trivial image
    with torch.no_grad():
        other = gen(eps, torch.tensor([1, 4, 9]))
    assert not torch.equal(img[0], other[0]) and torch.equal(img[1:], other[1:])


def test_consistency_generator_two_steps_uses_noise2():
    model = tiny_model(num_classes=0)
    eps, eps2 = _noise(2, 1, 8, 8, seed=1), _noise(2, 1, 8, 8, seed=2)
    gen = ConsistencyGenerator(model, steps=2).eval()
    assert gen.ts == consistency_times(2)
    with torch.no_grad():
        img = gen(eps, eps2)
        other = gen(eps, -eps2)
    ref = to_uint8_nhwc(sample_consistency(model, 0.5 * eps, steps=2, extra_noise=[0.5 * eps2]))
    assert torch.equal(img, ref) and img.shape == (2, 8, 8, 1)
    assert not torch.equal(img, other)


def test_heun_generator_equals_teacher_sampler():
    model = tiny_model(num_classes=0)
    eps = _noise(2, 1, 8, 8, seed=3)
    gen = HeunGenerator(model, num_steps=4).eval()
    with torch.no_grad():
        img = gen(eps)
    assert torch.equal(img, to_uint8_nhwc(heun_teacher_sample(model, eps, num_steps=4)))


def test_denoiser_graph_is_raw_network():
    model = tiny_model(num_classes=10)
    x, t, y = _noise(2, 1, 8, 8), torch.tensor([0.2, 1.4]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(DenoiserGraph(model)(x, t, y), model(x, t, y))

"""TrigFlow conversions, TrigFlowModel's derived quantities, JVPs through both backbones, bfloat16."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from quickstep.train.core import MLPConfig, ModelConfig, UNetConfig, build_model
from quickstep.train.core.networks import PositionalEmbedding, exact_autodiff
from quickstep.train.core.trigflow import (
    SIGMA_DATA,
    diffuse,
    sample_training_t,
    sigma_to_t,
    t_to_sigma,
    velocity_target,
    x_sigma_to_x_t,
    x_t_to_x_sigma,
)

from tests.helpers import perturb_zero_init, tiny_model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_model(num_classes: int = 0, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = build_model(ModelConfig(MLPConfig(dim=3, hidden=32, depth=2, emb_channels=16, num_classes=num_classes),
                                    logvar_channels=8))
    return perturb_zero_init(m, seed).eval()


# ----------------------------------------------------------------------------------------- trigflow
def test_sigma_t_round_trip():
    t = torch.linspace(0.01, 1.56, 50, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t)), t)
    sig = torch.logspace(-3, 2, 50, dtype=torch.float64)
    torch.testing.assert_close(t_to_sigma(sigma_to_t(sig)), sig)
    assert sigma_to_t(0.5) == pytest.approx(math.pi / 4)
    assert t_to_sigma(math.pi / 4, sigma_data=2.0) == pytest.approx(2.0)


def test_x_t_x_sigma_round_trip():
    g = _gen()
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    sig = torch.logspace(-2, 1.9, 6, dtype=torch.float64)
    t = sigma_to_t(sig)
    x_t = x_sigma_to_x_t(x, sig)
    torch.testing.assert_close(x_t, x * torch.cos(t).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(x_t_to_x_sigma(x_t, t), x)


def test_diffuse_and_velocity_are_consistent():
    """x_t = cos t x0 + sin t z; d x_t / dt = cos t z - sin t x0 = v_t; and x_sigma = x0 + sigma_d tan t eps."""
    g = _gen(1)
    x0, z = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 1.5
    h = 1e-6
    fd = (diffuse(x0, z, t + h) - diffuse(x0, z, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, z, t))
    torch.testing.assert_close(x_t_to_x_sigma(diffuse(x0, z, t), t), x0 + (torch.tan(t))[:, None] * z)


def test_training_time_distribution():
    t = sample_training_t(20_000, -1.0, 1.4, generator=_gen(2))
    assert t.shape == (20_000,) and bool(((t > 0) & (t < math.pi / 2)).all())
    tau = torch.log(t_to_sigma(t.double()))  # sigma = sigma_d tan t = e^tau
    assert float(tau.mean()) == pytest.approx(-1.0, abs=0.05)
    assert float(tau.std()) == pytest.approx(1.4, rel=0.03)
    assert torch.equal(sample_training_t(4, 0.0, 1.0, generator=_gen(3)), sample_training_t(4, 0.0, 1.0, generator=_gen(3)))


# ----------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def unet():
    return tiny_model(num_classes=10).double()


def test_denoise_matches_trigflow_formula(unet):
    g = _gen(4)
    x_sigma = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    y = torch.tensor([0, 5, 10])  # 10 = the null label
    with torch.no_grad():
        t = torch.atan(sigma / SIGMA_DATA)
        x_t = x_sigma * torch.cos(t).reshape(-1, 1, 1, 1)
        F = unet.backbone(x_t / SIGMA_DATA, t, y)
        by_hand = torch.cos(t).reshape(-1, 1, 1, 1) * x_t - torch.sin(t).reshape(-1, 1, 1, 1) * SIGMA_DATA * F
        torch.testing.assert_close(unet.denoise(x_sigma, sigma, y), by_hand)
        torch.testing.assert_close(unet.consistency(x_t, t, y), by_hand)
        torch.testing.assert_close(unet.velocity(x_t, t, y), SIGMA_DATA * F)
        # EDM score (D - x) / sigma^2 and TrigFlow score agree up to the change of variables x_t = cos t x_sigma
        edm = unet.edm_score(x_sigma, sigma, y)
        tf = unet.score(x_t, t, y)
        torch.testing.assert_close(tf, edm / torch.cos(t).reshape(-1, 1, 1, 1))
        # scalar sigma broadcasts
        torch.testing.assert_close(unet.denoise(x_sigma, 1.0, y), unet.denoise(x_sigma, torch.ones(3, dtype=torch.float64), y))
        assert unet.logvar(t).shape == (3,)


def test_class_labels_change_the_output(unet):
    x = torch.randn(2, 1, 8, 8, generator=_gen(5), dtype=torch.float64)
    t = torch.tensor([0.7, 0.7], dtype=torch.float64)
    with torch.no_grad():
        a, b = unet(x, t, torch.tensor([1, 1])), unet(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)


def _central_fd(fn, primals, tangents, h=1e-6):
    plus = fn(*[p + h * d for p, d in zip(primals, tangents, strict=True)])
    minus = fn(*[p - h * d for p, d in zip(primals, tangents, strict=True)])
    return (plus - minus) / (2 * h)


def _check_jvp(model, x, t, y):
    g = _gen(6)
    dx, dt = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randn(t.shape, generator=g, dtype=t.dtype)

    def fn(x_, t_):
        return model(x_, t_, y)

    with torch.no_grad():
        out, jvp = torch.func.jvp(fn, (x, t), (dx, dt))
        torch.testing.assert_close(out, fn(x, t))
        fd = _central_fd(fn, (x, t), (dx, dt))
    err = float((jvp - fd).abs().max() / fd.abs().max())
    assert fd.abs().max() > 1e-3 and err < 1e-5, f"JVP vs finite differences: rel err {err:.2e}"
    # and through the consistency function, as sCM training uses it
    fc = lambda x_, t_: model.consistency(x_, t_, y)  # noqa: E731
    with torch.no_grad():
        _, jvp_c = torch.func.jvp(fc, (x, t), (dx, dt))
        fd_c = _central_fd(fc, (x, t), (dx, dt))
    assert float((jvp_c - fd_c).abs().max() / fd_c.abs().max()) < 1e-5


def test_jvp_unet_with_attention_and_labels(unet):
    assert any(type(m).__name__ == "Attention" for m in unet.modules())
    x = torch.randn(2, 1, 8, 8, generator=_gen(7), dtype=torch.float64)
    _check_jvp(unet, x, torch.tensor([0.4, 1.3], dtype=torch.float64), torch.tensor([3, 7]))


def test_jvp_mlp():
    m = mlp_model(num_classes=4).double()
    x = torch.randn(5, 3, generator=_gen(8), dtype=torch.float64)
    _check_jvp(m, x, torch.linspace(0.1, 1.5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4]))


def test_jvp_float32_close_to_float64(unet):
    m32 = copy.deepcopy(unet).float()
    x = torch.randn(2, 1, 8, 8, generator=_gen(9), dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        _, j64 = torch.func.jvp(lambda a, b: unet(a, b, y), (x, t), (dx, dt))
        _, j32 = torch.func.jvp(lambda a, b: m32(a, b, y), (x.float(), t.float()), (dx.float(), dt.float()))
    assert float((j32.double() - j64).abs().max() / j64.abs().max()) < 1e-3


def test_positional_embedding_precise_in_bfloat16():
    """t * time_scale * freq must not be rounded to bfloat16 (the phase of the top frequency would be off by
    radians); a bf16 module embeds a bf16-representable t like the float32 module does."""
    p32 = PositionalEmbedding(32, scale=1000.0)
    pbf = copy.deepcopy(p32).to(torch.bfloat16)
    t = torch.tensor([0.3, 1.1, 1.5645]).bfloat16()
    diff = (pbf(t).float() - p32(t.float())).abs().max()
    assert pbf(t).dtype == torch.bfloat16 and float(diff) < 0.02


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_bfloat16_forward_and_jvp(kind):
    m32 = tiny_model(num_classes=10) if kind == "unet" else mlp_model(num_classes=4)
    shape = (2, 1, 8, 8) if kind == "unet" else (2, 3)
    x = torch.randn(shape, generator=_gen(10))
    t = torch.tensor([0.5, 1.0])
    y = torch.tensor([1, 2])
    mb = copy.deepcopy(m32).to(torch.bfloat16)
    with torch.no_grad():
        ref, out = m32(x, t, y), mb(x.bfloat16(), t.bfloat16(), y)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    assert float((out.float() - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-2
    _, j = torch.func.jvp(lambda a: mb(a, t.bfloat16(), y), (x.bfloat16(),), (torch.ones_like(x).bfloat16(),))
    assert j.dtype == torch.bfloat16 and bool(torch.isfinite(j).all())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m32(x, t, y)
    assert float((auto.float() - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-2


def test_unet_config_round_trips_through_dict():
    cfg = ModelConfig(UNetConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,), num_classes=3))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg2 = ModelConfig(MLPConfig(dim=5))
    assert ModelConfig.from_dict(cfg2.to_dict()) == cfg2
    assert cfg.sample_shape == (1, 16, 16) and cfg2.sample_shape == (5,)
    with pytest.raises(ValueError, match="unknown backbone kind"):
        ModelConfig.from_dict({"backbone": {"kind": "resnet"}})


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_cuda_forward_and_jvp_match_cpu(kind):
    """Both backbones on CUDA: float32 forward and torch.func.jvp match the CPU float64 reference; bfloat16
    (weights and autocast) stays finite and close.  Skipped without CUDA."""
    m = (tiny_model(num_classes=10) if kind == "unet" else mlp_model(num_classes=4)).double()
    shape = (4, 1, 8, 8) if kind == "unet" else (4, 3)
    x = torch.randn(shape, generator=_gen(11), dtype=torch.float64)
    t = torch.tensor([0.25, 0.75, 1.125, 1.5], dtype=torch.float64)  # exact in bfloat16
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    y = torch.tensor([1, 2, 3, 0])
    with torch.no_grad():
        ref, jref = torch.func.jvp(lambda a, b: m(a, b, y), (x, t), (dx, dt))
    mc = copy.deepcopy(m).float().cuda()
    args = [v.float().cuda() for v in (x, t, dx, dt)]
    yc = y.cuda()
    with torch.no_grad(), exact_autodiff():  # CUDA's fused SDPA kernels have no forward-mode AD
        out, j = torch.func.jvp(lambda a, b: mc(a, b, yc), (args[0], args[1]), (args[2], args[3]))
    assert float((out.double().cpu() - ref).abs().max() / ref.abs().max()) < 1e-3
    assert float((j.double().cpu() - jref).abs().max() / jref.abs().max()) < 1e-3
    # bfloat16 weights: the JVP stays finite and close on average (t is exact in bf16; sCM still keeps its JVP and
    # tangent in float32 because bf16 tangents lose the small time derivatives)
    mb = copy.deepcopy(mc).to(torch.bfloat16)
    with torch.no_grad(), exact_autodiff():
        _, jb = torch.func.jvp(lambda a, b: mb(a, b, yc), (args[0].bfloat16(), args[1].bfloat16()),
                               (args[2].bfloat16(), args[3].bfloat16()))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = mc(args[0], args[1], yc)
    assert jb.dtype == torch.bfloat16 and bool(torch.isfinite(jb).all())
    assert float((jb.double().cpu() - jref).abs().mean()) < 0.1 * float(jref.abs().mean())
    assert float((auto.double().cpu() - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-2

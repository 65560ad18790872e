"""The fast exact JVP of train/losses/scm.py (`forward_ad_jvp`, method "forward_ad"): same values as
torch.func.jvp in float64, fewer convolutions, and the sCM step it drives equals the torch.func.jvp one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quickstep.train.core import MLPConfig, ModelConfig, build_model
from quickstep.train.losses.scm import (
    JVP_METHODS,
    LinearisedLayers,
    SCMConfig,
    forward_ad_jvp,
    scm_step,
    trigflow_jvp,
)
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import perturb_zero_init, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a loaded 2-core machine (100x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x_t = 0.5 * torch.randn(shape, generator=g, dtype=dtype)
    t = 0.05 + 1.45 * torch.rand(shape[0], generator=g, dtype=dtype)
    v = torch.randn(shape, generator=g, dtype=dtype)
    return x_t, t, v


@pytest.mark.parametrize("num_classes", [0, 10])
def test_forward_ad_matches_torch_func_jvp_on_the_unet(num_classes):
    model = tiny_model(num_classes=num_classes, seed=3).double()
    x_t, t, v = _inputs((6, 1, 8, 8), seed=1)
    y = torch.arange(6) % 10 if num_classes else None
    F_ref, jvp_ref = trigflow_jvp(model, x_t, t, v, y, method="autograd")
    F_fast, jvp_fast = trigflow_jvp(model, x_t, t, v, y, method="forward_ad")
    torch.testing.assert_close(F_fast, F_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp_fast, jvp_ref, rtol=1e-10, atol=1e-12)
    assert float(jvp_ref.abs().mean()) > 1e-3  # a non-trivial derivative
    assert not F_fast.requires_grad and not jvp_fast.requires_grad


def test_forward_ad_matches_on_the_mlp():
    torch.manual_seed(0)
    model = perturb_zero_init(build_model(ModelConfig(MLPConfig(dim=3, hidden=16, depth=2)))).double()
    x_t, t, v = _inputs((9, 3), seed=2)
    ref = trigflow_jvp(model, x_t, t, v, method="autograd")
    fast = trigflow_jvp(model, x_t, t, v, method="forward_ad")
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,groups,affine", [((4, 8, 5, 5), 4, True), ((4, 8, 5, 5), 2, False),
                                                  ((7, 6), 1, True), ((3, 4, 2, 3, 2), 2, True)])
def test_group_norm_tangent_is_exact(shape, groups, affine):
    g = torch.Generator().manual_seed(4)
    x = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 1.0
    dx = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None

    def fn(x):
        return F.group_norm(x, groups, w, b, 1e-5)

    ref = torch.func.jvp(fn, (x,), (dx,))
    fast = forward_ad_jvp(fn, (x,), (dx,))
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_weights_with_tangents_fall_back_to_autograd():
    g = torch.Generator().manual_seed(5)
    x, dx = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, 6, generator=g,
                                                                                  dtype=torch.float64)
    w, dw = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    gw, dgw = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)

    def fn(x, w, gw):
        return F.group_norm(F.conv2d(x, w, None, 1, 1), 2, gw, None)

    ref = torch.func.jvp(fn, (x, w, gw), (dx, dw, dgw))
    fast = forward_ad_jvp(fn, (x, w, gw), (dx, dw, dgw))
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


class _CountConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_forward_ad_runs_two_convolutions_per_layer_not_three():
    model = tiny_model(seed=6)
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    x_t, t, v = _inputs((2, 1, 8, 8), seed=3, dtype=torch.float32)
    counts = {}
    for method in ("autograd", "forward_ad"):
        with _CountConvolutions() as c:
            trigflow_jvp(model, x_t, t, v, method=method)
        counts[method] = c.n
    assert counts["forward_ad"] == 2 * n_conv, counts
    assert counts["autograd"] > counts["forward_ad"], counts


def test_scm_step_is_the_same_with_either_exact_jvp():
    model = tiny_model(seed=8).double().train()
    x0, t, z = _inputs((5, 1, 8, 8), seed=9)
    outs = {m: scm_step(model, x0, 0.5 * z, t, None, SCMConfig(jvp=m), r=0.7) for m in ("autograd", "forward_ad")}
    torch.testing.assert_close(outs["forward_ad"].g, outs["autograd"].g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs["forward_ad"].loss, outs["autograd"].loss, rtol=1e-10, atol=1e-12)
    assert SCMConfig().jvp == "forward_ad" and "forward_ad" in JVP_METHODS
    with pytest.raises(ValueError, match="forward_ad"):
        SCMConfig(jvp="dual")


def test_the_mode_leaves_plain_tensors_alone():
    x = torch.randn(2, 4, 3, 3)
    w = torch.randn(4, 4, 1, 1)
    with LinearisedLayers():
        y = F.group_norm(F.conv2d(x, w), 2)
    torch.testing.assert_close(y, F.group_norm(F.conv2d(x, w), 2))

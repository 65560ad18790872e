"""The JVP engine of train.core (`quickstep.train.core.jvp`): the closed-form GroupNorm tangent relies on the
internal `torch.native_group_norm`; the version guard self-checks it on unknown torch versions and the fallback
(autograd's formula) gives the same JVP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from quickstep.train.core import jvp


def _gn_jvp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    dx = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    return jvp.forward_ad_jvp(lambda x: F.group_norm(x, 4, w, b), (x,), (dx,)), torch.func.jvp(
        lambda x: F.group_norm(x, 4, w, b), (x,), (dx,))


def test_native_group_norm_is_used_on_this_torch_and_matches_autograd():
    assert jvp.NATIVE_GROUP_NORM
    (y, dy), (y_ref, dy_ref) = _gn_jvp()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)


def test_unknown_torch_versions_self_check_the_op(monkeypatch):
    monkeypatch.setattr(jvp, "NATIVE_GROUP_NORM_CHECKED", ())
    assert jvp._native_group_norm_ok()  # the signature check passes on this torch
    monkeypatch.setattr(torch, "native_group_norm", lambda *a: (a[0], a[0], a[0]))  # a changed op
    assert not jvp._native_group_norm_ok()
    monkeypatch.delattr(torch, "native_group_norm")
    assert not jvp._native_group_norm_ok()


def test_fallback_without_the_native_op_gives_the_same_jvp(monkeypatch):
    monkeypatch.setattr(jvp, "NATIVE_GROUP_NORM", False)
    (y, dy), (y_ref, dy_ref) = _gn_jvp()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)

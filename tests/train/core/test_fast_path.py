"""The inference fast path of train.core: fused SDPA attention vs the math kernel (forward and backward, fp32 and
bf16), the explicit math kernel for the JVP and the double backward, channels_last, bfloat16 weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from quickstep.train.core import ModelConfig, UNetConfig, build_model
from quickstep.train.core.generator import ConsistencyGenerator, inference_copy
from quickstep.train.core.networks import Attention, attention_kernel, current_attention_kernel
from torch.overrides import TorchFunctionMode

from tests.helpers import perturb_zero_init


def _unet(num_heads: int = 2, seed: int = 0):
    cfg = ModelConfig(UNetConfig(img_channels=3, img_resolution=16, model_channels=16, channel_mult=(1, 2),
                                 attn_resolutions=(16, 8), num_heads=num_heads, num_classes=5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return perturb_zero_init(build_model(cfg), seed).eval()


def _inputs(b: int = 4, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g).to(dtype)
    t = torch.rand(b, generator=g) * 1.5 + 0.02
    y = torch.randint(0, 5, (b,), generator=g)
    return x, t, y


def _float64_reference():
    """The UNet in float64 on the math kernel: (model with the gradients of mean(out^2), inputs, output)."""
    ref_model = _unet().double()
    x, t, y = _inputs(dtype=torch.float64)
    with attention_kernel("math"):
        ref = ref_model(x, t, y)
    ref.square().mean().backward()
    return ref_model, (x, t, y), ref.detach()


def test_attention_kernel_context_selects_and_restores():
    assert current_attention_kernel() == "auto"
    with attention_kernel("math"):
        assert current_attention_kernel() == "math"
        with attention_kernel("sdpa"):
            assert current_attention_kernel() == "sdpa"
        assert current_attention_kernel() == "math"
    assert current_attention_kernel() == "auto"
    with pytest.raises(ValueError, match="'auto', 'sdpa', 'math'"):
        with attention_kernel("flash"):
            pass


@pytest.mark.parametrize("heads", [1, 2])
def test_sdpa_and_math_agree_forward_and_backward_fp32(heads):
    """One attention layer and the whole UNet: same output and same parameter/input gradients in float32."""
    torch.manual_seed(0)
    layer = perturb_zero_init(Attention(32, heads))
    x = torch.randn(3, 32, 8, 8)
    outs, grads = {}, {}
    for kernel in ("sdpa", "math"):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        with attention_kernel(kernel):
            out = layer(xi)
        out.square().sum().backward()
        outs[kernel] = out.detach()
        grads[kernel] = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
    torch.testing.assert_close(outs["sdpa"], outs["math"], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["sdpa"], grads["math"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    model = _unet(heads)
    x, t, y = _inputs()
    res = {}
    for kernel in ("sdpa", "math"):
        model.zero_grad()
        with attention_kernel(kernel):
            out = model(x, t, y)
        out.square().mean().backward()
        res[kernel] = (out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(res["sdpa"][0], res["math"][0], rtol=1e-5, atol=1e-5)
    assert len(res["sdpa"][1]) == len(res["math"][1]) > 0
    for a, b in zip(res["sdpa"][1], res["math"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_sdpa_and_math_agree_in_bfloat16_forward_and_backward():
    """bfloat16 weights and inputs: SDPA's error against the float64 reference is that of the math kernel (bf16
    rounding through the whole UNet), forward and parameter gradients."""
    ref_model, (x, t, y), ref = _float64_reference()
    pairs = [(n, p.grad) for n, p in ref_model.named_parameters() if p.grad is not None]
    err = {}
    for kernel in ("sdpa", "math"):
        m = copy.deepcopy(ref_model).bfloat16()
        m.zero_grad(set_to_none=True)
        with attention_kernel(kernel):
            out = m(x.bfloat16(), t, y)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        params = dict(m.named_parameters())
        g_err = sum(float((params[n].grad.double() - g).norm() ** 2) for n, g in pairs) ** 0.5
        g_ref = sum(float(g.norm() ** 2) for _, g in pairs) ** 0.5
        err[kernel] = (float((out.double() - ref).abs().mean()), float((out.double() - ref).abs().max()), g_err / g_ref)
    mean_ref = float(ref.abs().mean())
    for kernel, (mean_e, _, g_rel) in err.items():
        assert mean_e < 0.05 * mean_ref and g_rel < 0.1, (kernel, err)
    s_mean, s_max, s_g = err["sdpa"]
    m_mean, m_max, m_g = err["math"]
    assert s_mean < 1.25 * m_mean and s_max < 1.5 * m_max and s_g < 1.25 * m_g, err


class _CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def test_jvp_selects_the_math_kernel():
    """The exact JVPs run the math kernel even where SDPA is selected (fused SDPA kernels on CUDA have no forward-mode
    AD), the finite difference keeps the selected kernel; all three agree, and the default is back afterwards."""
    from quickstep.train.losses.scm import trigflow_jvp

    model = _unet().double()
    x, t, y = _inputs(dtype=torch.float64)
    v = torch.randn_like(x)
    res, calls = {}, {}
    for method in ("autograd", "forward_ad", "finite_difference"):
        with _CountSDPA() as count, attention_kernel("sdpa"):
            res[method] = trigflow_jvp(model, x, t, v, y, method=method, fd_eps=1e-5)
        calls[method] = count.calls
    assert calls["autograd"] == calls["forward_ad"] == 0 and calls["finite_difference"] > 0, calls
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    assert n_attn == 7
    # "auto": the math kernel on CPU (faster there, forward and backward), SDPA on CUDA; "sdpa" forces it
    with _CountSDPA() as count:
        with torch.no_grad():
            model(x, t, y)
        model(x, t, y).sum().backward()
        assert count.calls == 0
        with attention_kernel("sdpa"):
            model(x, t, y)
        assert count.calls == n_attn
    (F_a, j_a), (_, j_f), (F_d, j_d) = res["autograd"], res["forward_ad"], res["finite_difference"]
    torch.testing.assert_close(j_f, j_a, rtol=1e-9, atol=1e-10)
    assert float((j_d - j_a).abs().max()) < 1e-4 * float(j_a.abs().max())
    assert float((F_d - F_a).abs().max()) < 1e-4 * float(F_a.abs().max())
    assert current_attention_kernel() == "auto"


def test_fp_double_backward_runs_through_the_math_kernel():
    """The FP regulariser's create_graph VJP and the backward through it run on the math kernel (CUDA's fused SDPA
    kernels have no double backward), and the default kernel is back afterwards."""
    from quickstep.train.losses.base import Batch, StepContext, build_objective, get_objective_spec

    model = _unet().train()
    x, _, y = _inputs()
    obj = build_objective("fp", get_objective_spec("fp").config_cls())
    batch = Batch(x.clamp(-1, 1), y)
    ctx = StepContext(step=0, total_steps=10, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                      global_batch=batch)
    with _CountSDPA() as count:
        terms = obj(model, batch, ctx)
    assert terms and count.calls == 0 and current_attention_kernel() == "auto"  # fused kernels lack double backward
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_matches_and_keeps_nhwc():
    model = _unet()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        cl = copy.deepcopy(model).set_channels_last(True)
        out = cl(x, t, y)
    assert cl.backbone.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and back
    cl.set_channels_last(False)
    assert cl.backbone.conv_in.weight.is_contiguous() and not cl.backbone.channels_last


def test_inference_copy_bf16_weights_generator_matches_fp32_images():
    """A bfloat16-weight, channels_last generator: uint8 images within a few levels of float32's; no autocast."""
    model = _unet()
    fast = inference_copy(model, channels_last=True, dtype=torch.bfloat16)
    assert fast.backbone_dtype == torch.bfloat16 and model.backbone_dtype == torch.float32  # the original is kept
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.arange(8) % 5
    with torch.no_grad():
        ref = ConsistencyGenerator(model, 1)(noise, labels).int()
        out = ConsistencyGenerator(fast, 1)(noise, labels).int()
    assert out.shape == ref.shape == (8, 16, 16, 3)
    diff = (out - ref).abs()
    assert float(diff.float().mean()) < 1.5 and int(diff.max()) <= 12, (float(diff.float().mean()), int(diff.max()))
    with pytest.raises(ValueError, match="float32, bfloat16"):
        inference_copy(model, dtype=torch.int8)


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_matches_cpu_float64(dtype):
    """CUDA's fused SDPA kernels (flash / memory-efficient) vs the CPU float64 math reference: forward and parameter
    gradients, float32 (TF32 off) and bfloat16."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref_model, (x, t, y), ref = _float64_reference()
    m = copy.deepcopy(ref_model).to("cuda", dtype)
    m.zero_grad(set_to_none=True)
    with attention_kernel("sdpa"):
        out = m(x.to("cuda", dtype), t.cuda(), y.cuda())
    out.float().square().mean().backward()
    tol = 1e-3 if dtype == torch.float32 else 0.05
    assert float((out.double().cpu() - ref).abs().mean()) < tol * float(ref.abs().mean())
    params = dict(m.named_parameters())
    for n, p in ref_model.named_parameters():
        if p.grad is not None:
            g = params[n].grad.double().cpu()
            assert float((g - p.grad).norm()) < 10 * tol * float(p.grad.norm()) + 1e-6, n


@pytest.mark.gpu
def test_cuda_compiled_bf16_channels_last_generator_matches_cpu():
    """The serving fast path: torch.compile(mode="reduce-overhead") of the 2-step generator with bfloat16 weights
    and channels_last on CUDA: uint8 images within a few levels of the CPU float32 eager generator."""
    model = _unet()
    fast = inference_copy(model.cuda(), channels_last=True, dtype=torch.bfloat16)
    gen = torch.compile(ConsistencyGenerator(fast, 2).eval(), mode="reduce-overhead", dynamic=False)
    g = torch.Generator().manual_seed(4)
    noise, noise2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.arange(8) % 5
    with torch.inference_mode():
        for _ in range(3):  # CUDA graphs record on a later call
            out = gen(noise.cuda(), noise2.cuda(), labels.cuda()).cpu().int()
        ref = ConsistencyGenerator(model.cpu(), 2)(noise, noise2, labels).int()
    diff = (out - ref).abs()
    assert float(diff.float().mean()) < 1.5 and int(diff.max()) <= 12

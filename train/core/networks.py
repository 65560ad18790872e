"""Backbones F(x_in, t, class_labels): a UNet for images and an MLP for vectors.

Both follow the sCM recipe: time enters as c_noise = t through a positional embedding, features are
modulated by adaptive double normalisation y = norm(x) * pnorm(s(emb)) + pnorm(b(emb)), GroupNorm only, no
in-place ops on activations.

Attention has two kernels computing the same function: `F.scaled_dot_product_attention` (fused flash /
memory-efficient kernels) and plain math (einsum + softmax).  The default, "auto", takes SDPA on CUDA (forward and
backward) and the math kernel on CPU, where torch's CPU flash kernel measured 1.08-1.33x slower than the BLAS
batched matmuls forward and 1.02-1.05x forward + backward at the presets' 64 and 256 tokens
(tests/benchmarks/bench_fast_path.py, docs/performance.md).  Fused attention has no forward-mode AD and no double
backward, so the JVP
(`torch.func.jvp`, dual numbers) and the FP regulariser's double backward select the math kernel explicitly with
`exact_autodiff()` (which also runs a compiled backbone eagerly).

Layout and precision for fast inference: `UNet.set_channels_last(True)` keeps activations NHWC (channels_last)
end to end; a module cast to bfloat16 (`module.to(torch.bfloat16)`) runs in bfloat16 without autocast
re-casting every call (`TrigFlowModel.forward` casts x in and the output back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class UNetConfig:
    """A UNet for images [B, C, H, W]."""

    img_channels: int = 1
    img_resolution: int = 16
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional; otherwise an extra "null" label num_classes is reserved
    emb_channels: int | None = None  # default 4 * model_channels
    time_scale: float = 1000.0  # positional embedding of c_noise = t sees t * time_scale

    kind: str = field(default="unet", init=False)


@dataclass(frozen=True)
class MLPConfig:
    """A residual MLP for vectors [B, D]."""

    dim: int = 2
    hidden: int = 128
    depth: int = 3
    dropout: float = 0.0
    num_classes: int = 0
    emb_channels: int = 64
    time_scale: float = 1000.0

    kind: str = field(default="mlp", init=False)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a TrigFlowModel from JSON."""

    backbone: UNetConfig | MLPConfig
    sigma_data: float = 0.5
    logvar_channels: int = 64  # 0 disables the adaptive-weighting head

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"]["kind"] = self.backbone.kind
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        b = dict(d["backbone"])
        kind = b.pop("kind", "unet")
        if kind == "unet":
            for k in ("channel_mult", "attn_resolutions"):
                if k in b:
                    b[k] = tuple(b[k])
            backbone: UNetConfig | MLPConfig = UNetConfig(**b)
        elif kind == "mlp":
            backbone = MLPConfig(**b)
        else:
            raise ValueError(f"unknown backbone kind {kind!r}; expected 'unet' or 'mlp'")
        return ModelConfig(
            backbone=backbone,
            sigma_data=float(d["sigma_data"]),  # format-1 files without it are migrated by quickstep.artifacts
            logvar_channels=int(d["logvar_channels"]),
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch axis)."""
        b = self.backbone
        if isinstance(b, UNetConfig):
            return (b.img_channels, b.img_resolution, b.img_resolution)
        return (b.dim,)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes


# ----------------------------------------------------------------------------------------------- layers
class PositionalEmbedding(nn.Module):
    """Sinusoidal positional embedding of a scalar per sample (DDPM++/sCM): [B] -> [B, C]."""

    def __init__(self, num_channels: int, max_positions: int = 10000, scale: float = 1.0):
        super().__init__()
        half = num_channels // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)  # follows the module's dtype/device
        self.scale = scale
        self.max_positions = max_positions

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # computed in >= float32 even in a bfloat16/float16 module: t * scale * freq needs the precision
        dt = torch.promote_types(self.freqs.dtype, torch.float32)
        half = self.freqs.shape[0]
        freqs = (1.0 / self.max_positions) ** (torch.arange(half, dtype=dt, device=self.freqs.device) / half)
        x = (t.to(dt) * self.scale)[:, None] * freqs[None, :]  # [B, C/2]
        return torch.cat([torch.cos(x), torch.sin(x)], dim=1).to(self.freqs.dtype)


def pixel_norm(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Normalise each vector (dim 1) to unit RMS."""
    return x / torch.sqrt(torch.mean(x.square(), dim=1, keepdim=True) + eps)


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2:
            return g
    return 1


class AdaptiveDoubleNorm(nn.Module):
    """y = GroupNorm(x) * pnorm(s(emb)) + pnorm(b(emb))  (sCM, adaptive double normalisation)."""

    def __init__(self, channels: int, emb_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.scale = nn.Linear(emb_channels, channels)
        self.shift = nn.Linear(emb_channels, channels)
        nn.init.zeros_(self.scale.weight)
        nn.init.ones_(self.scale.bias)
        nn.init.zeros_(self.shift.weight)
        nn.init.zeros_(self.shift.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        s = pixel_norm(self.scale(emb))  # [B, C]
        b = pixel_norm(self.shift(emb))  # [B, C]
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return self.norm(x) * s.reshape(shape) + b.reshape(shape)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(cin), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = AdaptiveDoubleNorm(cout, emb_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = self.conv1(self.dropout(F.silu(self.norm1(h, emb))))
        return (h + self.skip(x)) / math.sqrt(2)


ATTENTION_KERNELS = ("auto", "sdpa", "math")
_attention = {"kernel": "auto"}  # process-wide; read at trace time by torch.compile (a guarded global)


@contextlib.contextmanager
def attention_kernel(kernel: str) -> Iterator[None]:
    """Select the attention kernel inside the block: "sdpa" (F.scaled_dot_product_attention), "math" (einsum +
    softmax, the only one with forward-mode AD and double backward on CUDA) or "auto" (SDPA on CUDA, math on CPU,
    where it measured faster).  Restores the previous kernel on exit."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    prev = _attention["kernel"]
    _attention["kernel"] = kernel
    try:
        yield
    finally:
        _attention["kernel"] = prev


def current_attention_kernel() -> str:
    return _attention["kernel"]


@contextlib.contextmanager
def exact_autodiff() -> Iterator[None]:
    """What forward-mode AD and double backward need: the math attention kernel, and compiled modules (a
    `torch.compile`d backbone) run eagerly (neither functorch transforms nor AOTAutograd's double backward go
    through compiled graphs)."""
    stance = getattr(torch.compiler, "set_stance", None)
    with attention_kernel("math"), (stance("force_eager") if stance is not None else contextlib.nullcontext()):
        yield


class Attention(nn.Module):
    """Multi-head self-attention over pixels: fused SDPA or plain math (see `attention_kernel`)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3, c // self.num_heads, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B*heads, C/heads, HW]
        kernel = _attention["kernel"]
        if kernel == "math" or (kernel == "auto" and not x.is_cuda):
            scale = 1.0 / math.sqrt(c // self.num_heads)
            attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * scale, dim=-1)  # [B*heads, HW, HW]
            out = torch.einsum("bij,bcj->bci", attn, v)
        else:  # the same softmax(q^T k / sqrt(C/heads)) v on [B*heads, HW, C/heads]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        return (x + self.proj(out.reshape(b, c, h, w))) / math.sqrt(2)


class _Embedder(nn.Module):
    """t (and an optional class label) -> embedding vector [B, E]."""

    def __init__(self, emb_channels: int, num_classes: int, time_scale: float, pos_channels: int):
        super().__init__()
        self.pos = PositionalEmbedding(pos_channels, scale=time_scale)
        self.map0 = nn.Linear(pos_channels, emb_channels)
        self.map1 = nn.Linear(emb_channels, emb_channels)
        self.num_classes = num_classes
        # index num_classes is the "null" label used for classifier-free guidance dropout
        self.label = nn.Embedding(num_classes + 1, emb_channels) if num_classes > 0 else None

    def forward(self, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map1(F.silu(self.map0(self.pos(t))))
        if self.label is not None:
            if class_labels is None:
                class_labels = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label(class_labels.long())
        return F.silu(emb)


# ----------------------------------------------------------------------------------------------- backbones
class UNet(nn.Module):
    """F(x_in [B,C,H,W], t [B], class_labels [B] | None) -> [B,C,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_ch = cfg.emb_channels or 4 * ch
        self.embed = _Embedder(emb_ch, cfg.num_classes, cfg.time_scale, pos_channels=ch)
        self.conv_in = nn.Conv2d(cfg.img_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, cfg.img_resolution
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_blocks):
                self.down.append(self._block(cur, ch * mult, emb_ch, res))
                cur = ch * mult
                skips.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                res //= 2
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_ch, cfg.dropout), Attention(cur, cfg.num_heads),
                                  ResBlock(cur, cur, emb_ch, cfg.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_blocks + 1):
                self.up.append(self._block(cur + skips.pop(), ch * mult, emb_ch, res))
                cur = ch * mult
            if level != 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, cfg.img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _block(self, cin: int, cout: int, emb_ch: int, res: int) -> nn.Module:
        blocks = [ResBlock(cin, cout, emb_ch, self.cfg.dropout)]
        if res in self.cfg.attn_resolutions:
            blocks.append(Attention(cout, self.cfg.num_heads))
        return nn.ModuleList(blocks)

    @staticmethod
    def _run(block: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.ModuleList):
            for layer in block:
                x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
            return x
        return block(x)

    channels_last = False  # set_channels_last(True): NHWC activations (inputs converted on entry)

    def set_channels_last(self, enabled: bool = True) -> UNet:
        """Convert the 4-D weights to channels_last (or back) and make forward convert its input likewise."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.embed(t, class_labels)  # [B, E]
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm = AdaptiveDoubleNorm(hidden, emb_channels)
        self.fc0 = nn.Linear(hidden, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.fc1(self.dropout(F.silu(self.fc0(F.silu(self.norm(x, emb))))))


class MLP(nn.Module):
    """F(x_in [B,D], t [B], class_labels [B] | None) -> [B,D]."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = _Embedder(cfg.emb_channels, cfg.num_classes, cfg.time_scale, pos_channels=cfg.emb_channels)
        self.fc_in = nn.Linear(cfg.dim, cfg.hidden)
        self.blocks = nn.ModuleList([MLPBlock(cfg.hidden, cfg.emb_channels, cfg.dropout) for _ in range(cfg.depth)])
        self.norm_out = nn.GroupNorm(1, cfg.hidden)
        self.fc_out = nn.Linear(cfg.hidden, cfg.dim)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, class_labels)
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.norm_out(h)))


def build_backbone(cfg: UNetConfig | MLPConfig) -> nn.Module:
    if isinstance(cfg, UNetConfig):
        return UNet(cfg)
    if isinstance(cfg, MLPConfig):
        return MLP(cfg)
    raise TypeError(f"unknown backbone config {type(cfg).__name__}")

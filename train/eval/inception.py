"""Inception-v3 features for FID/KID on CIFAR-10 / ImageNet, from a LOCAL weights file (nothing is downloaded).

The architecture is the "FID Inception" of TensorFlow's reference FID (Szegedy et al. 2016, as ported by
pytorch-fid): torchvision's Inception3 layout and parameter names, 1008 logits, no auxiliary head, and the
three FID patches -- average pools that exclude padding in the A/C/E blocks, and a max pool in the branch
pool of the last E block.  Features are the 2048-d output of the final average pool.  Written in plain torch
(torchvision is not a dependency).

Accepted weights files (given by path):
- `*.safetensors` holding the pytorch-fid state dict (e.g. converted once with
  `safetensors.torch.save_file(torch.load("pt_inception-2015-12-05-6726825d.pth"), "inception.safetensors")`);
- `*.pt` / `*.pth`: a plain state dict such as pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, loaded
  with `torch.load(..., weights_only=True)` (no code is unpickled).
Keys follow torchvision (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`, ...);
`num_batches_tracked` may be absent and `AuxLogits.*` is ignored.

Input: images [N, C, H, W] in [-1, 1] with C = 1 or 3 (grey is repeated); resized bilinearly to 299 x 299.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNorm (eps 1e-3) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)  # FID patch


class InceptionA(nn.Module):
    """Mixed_5b/c/d (FIDInceptionA)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..e (FIDInceptionC): factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used by TF/pytorch-fid FID; `forward` returns the 2048-d pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # kept so the pytorch-fid state dict loads strictly; unused for features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 1|3, H, W] in [-1, 1] -> features [N, 2048]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [N, 1 or 3, H, W] in [-1, 1], got {list(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        # pytorch-fid: images in [0, 1] are resized to 299 then mapped by 2x - 1; ours already live in [-1, 1]
        x = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # [N, 2048]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.pth state dict loaded with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Inception weights {str(p)!r} not found; pass a local .safetensors or .pt/.pth "
                                "file with the pytorch-fid FID Inception state dict (nothing is downloaded)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    if p.suffix in (".pt", ".pth"):
        sd = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{p} is not a state dict of tensors")
        return sd
    raise ValueError(f"unsupported Inception weights format {p.suffix!r}; allowed: .safetensors, .pt, .pth")


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build FIDInceptionV3 and load a pytorch-fid-compatible state dict from a local file."""
    sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith("AuxLogits.")}
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} is not an FID Inception-v3 state dict: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    model.load_state_dict(sd, strict=False)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """2048-d pool features [N, 2048] of images [N, C, H, W] in [-1, 1]."""
    dev = next(model.parameters()).device
    return torch.cat([model(images[i : i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)])


__all__ = ["FEATURE_DIM", "FIDInceptionV3", "inception_features", "load_inception", "read_state_dict"]

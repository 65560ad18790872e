"""The digits feature network: a small CNN trained deterministically on the digits TRAIN split.

Its penultimate layer (128 ReLU features) is the feature space of FD / KID / precision-recall for digits
(the role Inception-v3 plays for CIFAR-10), and its logits give the class accuracy of class-conditional
samples.  The weights ship in the package (`digits_classifier.safetensors`, ~330 kB) with a JSON card
(`digits_classifier.json`: architecture, training recipe, measured test accuracy);
`train_classifier()` regenerates them bit-for-bit on the same torch build:

    python -m quickstep.train.eval.classifier          # retrain, evaluate on the test split, write both files

Input: images [N, 1, 16, 16] in [-1, 1] (the `digits` data set at its default resolution).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
WEIGHTS_PATH = HERE / "digits_classifier.safetensors"
CARD_PATH = HERE / "digits_classifier.json"
INPUT_SHAPE = (1, 16, 16)
FEATURE_DIM = 128
NUM_CLASSES = 10


@dataclass(frozen=True)
class ClassifierConfig:
    """Training recipe of the digits classifier (Adam, random +-1 px shifts, fixed seed)."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation augmentation, in pixels


class DigitsCNN(nn.Module):
    """conv16-conv16-pool-conv32-conv32-pool-fc128-fc10 (GroupNorm-free, ReLU; ~82k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 128] of images x [N, 1, 16, 16] in [-1, 1]."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.max_pool2d(h, 2)  # [N, 16, 8, 8]
        h = F.relu(self.conv4(F.relu(self.conv3(h))))
        h = F.max_pool2d(h, 2)  # [N, 32, 4, 4]
        return F.relu(self.fc1(h.flatten(1)))  # [N, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.fc2(self.features(x))


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != INPUT_SHAPE:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"the digits classifier takes images [N, 1, 16, 16] in [-1, 1]; got {shape}")
    return images.float()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with -1 (background)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)  # [N, C, H+2s, W+2s]
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = [pad[i, :, int(off[i, 0]) : int(off[i, 0]) + h, int(off[i, 1]) : int(off[i, 1]) + w] for i in range(n)]
    return torch.stack(rows)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on images x [N, 1, 16, 16] with labels y [N]."""
    model.eval()
    pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


def train_classifier(config: ClassifierConfig = ClassifierConfig(), *, out: str | Path | None = None,
                     progress: bool = False, evaluate: bool = True) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train the digits CNN deterministically on the digits train split; evaluate it on the test split.

    Returns (model, card).  With `out` (a directory), writes digits_classifier.safetensors + .json there;
    evaluate=False skips the accuracy measurements (the card then has none)."""
    from ..data import load_dataset

    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    g = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # parameter init from a fixed seed, global RNG left untouched
        torch.manual_seed(config.seed)
        model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    batches = train.batches(config.batch_size, generator=g)
    t0 = time.perf_counter()
    model.train()
    for step in range(config.steps):
        x, y = next(batches)
        x = random_shift(x, config.max_shift, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % 250 == 0:
            print(f"step {step + 1}/{config.steps} loss {float(loss):.4f}")
    model.eval()
    card = {
        "name": "quickstep digits classifier",
        "architecture": "DigitsCNN: conv16-conv16-pool-conv32-conv32-pool-fc128-fc10, ReLU",
        "input": "images [N, 1, 16, 16] in [-1, 1] (digits data set, default resolution)",
        "feature_layer": "fc1 (penultimate, 128 ReLU units)",
        "feature_dim": FEATURE_DIM,
        "num_classes": NUM_CLASSES,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_split": f"digits train ({len(train)} images)",
        "test_split": f"digits test ({len(test)} images)",
        "train_accuracy": round(accuracy(model, train.x, train.y), 4) if evaluate else None,
        "test_accuracy": round(accuracy(model, test.x, test.y), 4) if evaluate else None,
        "recipe": asdict(config),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch_version": torch.__version__,
    }
    if out is not None:
        save_classifier(model, card, Path(out))
    return model, card


def save_classifier(model: DigitsCNN, card: dict[str, Any], out_dir: Path) -> None:
    """Write digits_classifier.safetensors and digits_classifier.json into out_dir."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_PATH.name))
    (out_dir / CARD_PATH.name).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def load_classifier(path: str | Path | None = None) -> DigitsCNN:
    """The shipped (or a given) digits classifier in eval mode, on the CPU (safetensors; nothing unpickled)."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else WEIGHTS_PATH
    if not p.exists():
        raise FileNotFoundError(f"digits classifier weights {str(p)!r} not found; regenerate them with "
                                "`python -m quickstep.train.eval.classifier`")
    model = DigitsCNN()
    model.load_state_dict(load_file(str(p)))
    return model.eval().requires_grad_(False)


def classifier_card(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON card shipped with the weights (test accuracy, recipe)."""
    return json.loads(Path(path or CARD_PATH).read_text())


@functools.lru_cache(maxsize=1)
def _shipped() -> DigitsCNN:
    return load_classifier()


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate-layer features [N, 128] of the shipped classifier for images [N, 1, 16, 16] in [-1, 1]."""
    x = _check_images(images).cpu()
    net = _shipped()
    return torch.cat([net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def classify(images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels [N] (int64) of the shipped classifier for images [N, 1, 16, 16] in [-1, 1]."""
    x = _check_images(images).cpu()
    net = _shipped()
    return torch.cat([net(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples the classifier assigns to the class they were drawn for."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
    return float((classify(images) == labels.cpu()).float().mean())


def main() -> None:
    """Retrain the shipped classifier and overwrite the packaged files."""
    _, card = train_classifier(out=HERE, progress=True)
    print(json.dumps({k: card[k] for k in ("train_accuracy", "test_accuracy", "train_seconds")}))


if __name__ == "__main__":
    main()

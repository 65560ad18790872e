"""Feeding the trainer: a distributed, infinite, seeded sampler and the per-step batch feed.

The sample order is a pure function of (seed, position): position p of the endless stream is element p mod M of
the permutation of epoch p // M (M = N, or 2N with x-flip: index i >= N is image i - N mirrored, EDM's x-flip as
extra indices).  Step k's global batch is positions [kB, (k+1)B); DDP rank r reads its own part of it, positions
[kB + r b, kB + (r+1) b) with b = B / world size, so the ranks split every epoch between them without overlap.
The checkpoint stores the position (as {"epoch", "pos"}); resuming restarts the stream there, so a resumed run
draws exactly the batches of an uninterrupted one, whatever was prefetched when it stopped.

`DataFeed` serves each step (global batch, local batch) as float32 on the device:
- in-memory sets (`data.Dataset`, uint8 or float, memory-mapped for prepared sets) are indexed directly, on the
  device, and converted to [-1, 1] per batch;
- streamed sets (`sources.FileSource`) go through a `torch.utils.data.DataLoader` with worker processes, pinned
  memory (CUDA) and prefetch; each rank loads only its rows and the global batch is all-gathered when distributed.
It also measures the data throughput (images per second the pipeline can deliver) and the time the trainer waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .data import Dataset, to_unit

SEED_STRIDE = 1_000_003  # epoch e's permutation is seeded by seed * SEED_STRIDE + e (the historical sampler's rule)


class InfiniteSampler:
    """Endless shuffled indices in [0, M): successive seeded permutations; its state is one position."""

    def __init__(self, n: int, seed: int, *, xflip: bool = False):
        if n < 1:
            raise ValueError("the data set is empty")
        self.n, self.seed, self.xflip = n, seed, xflip
        self.size = 2 * n if xflip else n
        self.position = 0
        self._cache: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
            self._cache = (epoch, torch.randperm(self.size, generator=g))
        return self._cache[1]

    def indices(self, start: int, k: int) -> torch.Tensor:
        """The indices at stream positions [start, start + k)."""
        out = []
        while k > 0:
            epoch, pos = divmod(start, self.size)
            take = min(k, self.size - pos)
            out.append(self._perm(epoch)[pos : pos + take])
            start, k = start + take, k - take
        return torch.cat(out)

    def next(self, k: int) -> torch.Tensor:
        """The next k indices (advances the position)."""
        out = self.indices(self.position, k)
        self.position += k
        return out

    def rank_batches(self, batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
        """From the current position on (without advancing it): rank `rank`'s rows of every global batch."""
        local = batch_size // world_size
        view = InfiniteSampler(self.n, self.seed, xflip=self.xflip)  # its own permutation cache (another thread)
        start = self.position
        while True:
            yield view.indices(start + rank * local, local).tolist()
            start += batch_size

    def state_dict(self) -> dict[str, int]:
        epoch, pos = divmod(self.position, self.size)
        return {"epoch": epoch, "pos": pos, "size": self.size}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        size = int(s.get("size", self.size))
        if size != self.size:
            raise ValueError(f"the checkpoint's sampler covers {size} indices per epoch, this data set {self.size}; "
                             f"resume with the data set the run started with")
        self.position = int(s["epoch"]) * self.size + int(s["pos"])


def flip_rows(x: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror (left-right) the rows of `x` whose index is >= n (x-flip indices)."""
    flip = idx >= n
    if bool(flip.any()):
        x[flip] = x[flip].flip(-1)
    return x


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    t0 = time.perf_counter()
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return x, y, time.perf_counter() - t0


class _Timed(torch.utils.data.Dataset):
    """Wraps a source so each worker reports the seconds it spent decoding (data throughput)."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, idx: list[int]) -> list[Any]:
        t0 = time.perf_counter()
        items = [self.source[i] for i in idx]
        return [(*items[0], time.perf_counter() - t0), *items[1:]]

    def __getitem__(self, i: int) -> Any:
        return self.source[i]


def _collate_timed(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    decode = items[0][2] if len(items[0]) == 3 else 0.0
    x, y, stack = _collate([it[:2] for it in items])
    return x, y, decode + stack


def worker_error(e: BaseException) -> str:
    """The original message of an error re-raised from a DataLoader worker (which prepends a traceback)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else str(e)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class DataFeed:
    """Per-step batches of the trainer (see the module docstring)."""

    def __init__(self, dataset: Any, sampler: InfiniteSampler, *, device: torch.device, batch_size: int,
                 rank: int = 0, world_size: int = 1, workers: int = 2, prefetch: int = 2,
                 conditional: bool = True):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local = batch_size // world_size
        self.n = len(dataset)
        self.streamed = not isinstance(dataset, Dataset)
        self.has_labels = conditional and (dataset.y is not None if not self.streamed else dataset.labels is not None)
        self.workers, self.prefetch = workers, prefetch
        self._iter: Iterator[Any] | None = None
        self._loader: Any = None
        self.reset_stats()
        if not self.streamed:
            self.data = dataset.data.to(device)
            self.labels = dataset.y.to(device) if dataset.y is not None else None

    # -- statistics ----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.images = 0  # images this rank received since the last reset
        self.busy_s = 0.0  # seconds the pipeline spent producing them (workers: summed decode time / workers)
        self.wait_s = 0.0  # seconds the trainer waited for them

    def stats(self) -> dict[str, float]:
        """{data_img_per_s: images per second the pipeline can deliver (per rank), data_wait_s: seconds waited}."""
        return {"data_img_per_s": self.images / max(self.busy_s, 1e-9), "data_wait_s": self.wait_s}

    # -- batches -------------------------------------------------------------------------------
    def _loader_iter(self) -> Iterator[Any]:
        if self._iter is None:
            pin = self.device.type == "cuda"
            kw: dict[str, Any] = {}
            if self.workers > 0:
                kw = {"prefetch_factor": self.prefetch, "persistent_workers": True, "worker_init_fn": _worker_init}
            self._loader = torch.utils.data.DataLoader(
                _Timed(self.dataset), batch_sampler=self.sampler.rank_batches(self.batch_size, self.rank,
                                                                              self.world_size),
                num_workers=self.workers, pin_memory=pin, collate_fn=_collate_timed, **kw)
            self._iter = iter(self._loader)
        return self._iter

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(global x, global y, local x, local y) of the next step; x float32 in [-1, 1] on the device."""
        t0 = time.perf_counter()
        if not self.streamed:
            idx = self.sampler.next(self.batch_size).to(self.device)
            base = idx % self.n if self.sampler.xflip else idx
            gx = flip_rows(to_unit(self.data[base]), idx, self.n) if self.sampler.xflip else to_unit(self.data[base])
            gy = self.labels[base] if self.has_labels and self.labels is not None else None
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.wait_s += dt
            self.images += self.local
            lo, hi = self.rank * self.local, (self.rank + 1) * self.local
            return gx, gy, gx[lo:hi], None if gy is None else gy[lo:hi]
        try:
            x8, y, busy = next(self._loader_iter())
        except (ValueError, OSError) as e:  # a worker's error: keep the message, drop the re-raised traceback
            raise ValueError(f"data loading failed: {worker_error(e)}") from None
        self.sampler.position += self.batch_size
        self.wait_s += time.perf_counter() - t0
        self.busy_s += busy / max(self.workers, 1)
        self.images += self.local
        x8 = x8.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if self.has_labels else None
        if self.world_size > 1:
            parts = [torch.empty_like(x8) for _ in range(self.world_size)]
            dist.all_gather(parts, x8)
            gx8 = torch.cat(parts)
            gy = None
            if y is not None:
                yparts = [torch.empty_like(y) for _ in range(self.world_size)]
                dist.all_gather(yparts, y)
                gy = torch.cat(yparts)
        else:
            gx8, gy = x8, y
        gx = to_unit(gx8)
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        return gx, gy, gx[lo:hi], None if gy is None else gy[lo:hi]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `idx` (unflipped indices < N) as float on the device, with their labels (STF reference rows)."""
        if not self.streamed:
            idx = idx.to(self.device)
            return to_unit(self.data[idx]), (self.labels[idx] if self.has_labels and self.labels is not None else None)
        items = [self.dataset[int(i)] for i in idx]
        x = torch.stack([it[0] for it in items]).to(self.device) if items else torch.empty(
            (0, *self.dataset.shape), dtype=torch.uint8, device=self.device)
        y = torch.tensor([it[1] for it in items], dtype=torch.int64, device=self.device) if self.has_labels else None
        return to_unit(x), y

    def close(self) -> None:
        self._iter = None
        self._loader = None


__all__ = ["DataFeed", "InfiniteSampler", "flip_rows"]

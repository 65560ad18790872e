"""Micro-batching (DESIGN.md "Serving contract"): merge queued requests up to max_batch images or max_wait,
run them on the device's worker thread, split the results back."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from .errors import BackendFailure, ClientGone, DeadlineExceeded, QueueFull, ShuttingDown
from .metrics import ServeMetrics

log = logging.getLogger("quickstep.serve")

RunFn = Callable[[int, list[np.ndarray], "np.ndarray | None"], np.ndarray]
Disconnected = Callable[[], bool]  # True once the client has gone (a cheap flag check, no I/O)


@dataclass(eq=False)
class Job:
    """One request's share of work: n images for one step count."""

    steps: int
    noises: list[np.ndarray] = field(repr=False)  # each [n, C, H, W] float32
    labels: np.ndarray | None = field(repr=False)  # [n] int64
    deadline: float  # loop.time() after which the result is useless
    disconnected: Disconnected | None = field(default=None, repr=False)
    future: asyncio.Future = field(default=None, repr=False)  # type: ignore[assignment]
    enqueued: float = 0.0

    @property
    def n(self) -> int:
        return int(self.noises[0].shape[0])


class MicroBatcher:
    """A bounded queue per model; one collector task forms batches (same `steps`; labels may differ per image)."""

    def __init__(self, model: str, run: RunFn, executor: Executor, metrics: ServeMetrics, *, max_batch: int,
                 max_wait_s: float, max_queue: int):
        self.model = model
        self._run = run
        self._executor = executor
        self._m = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._batch_s = 0.01  # moving average of a batch's compute time (for Retry-After)
        self._outstanding = 0  # requests submitted and not yet answered (queued or running)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Start the collector task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.model}")

    async def submit(self, job: Job) -> np.ndarray:
        """Queue `job`, wait for its images [n, H, W, C] uint8; QueueFull / DeadlineExceeded / ShuttingDown."""
        if self._closing or self._task is None:
            raise ShuttingDown(f"model {self.model!r} is not accepting work (server shutting down)")
        if len(self._queue) >= self.max_queue:
            retry = max(1, int(np.ceil(self._batch_s * (1 + len(self._queue) / max(1, self.max_batch)))))
            self._m.dropped.labels(self.model, "queue_full").inc()
            raise QueueFull(f"the queue of model {self.model!r} is full ({self.max_queue} requests waiting); "
                            f"retry after {retry} s", headers={"Retry-After": str(retry)})
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.enqueued = loop.time()
        self._queue.append(job)
        self._outstanding += 1
        self._m.queue_depth.labels(self.model).set(len(self._queue))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(job.future, max(0.0, job.deadline - loop.time()))
        except (asyncio.TimeoutError, TimeoutError):
            self._m.dropped.labels(self.model, "deadline").inc()
            raise DeadlineExceeded(f"the request did not complete within its deadline "
                                   f"({(job.deadline - job.enqueued) * 1000:.0f} ms)") from None
        finally:
            self._outstanding -= 1
            if not job.future.done():
                job.future.cancel()
            self._discard(job)

    def _discard(self, job: Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            pass
        self._m.queue_depth.labels(self.model).set(len(self._queue))

    def _take_batch(self) -> list[Job]:
        """Pop the head job and every later job with the same steps while the batch stays <= max_batch images."""
        head = self._queue[0]
        batch, total = [], 0
        for job in list(self._queue):
            if job.steps != head.steps:
                continue
            if batch and total + job.n > self.max_batch:
                break
            batch.append(job)
            total += job.n
        for job in batch:
            self._queue.remove(job)
        self._m.queue_depth.labels(self.model).set(len(self._queue))
        return batch

    def _ready_images(self, steps: int) -> int:
        return sum(j.n for j in self._queue if j.steps == steps)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            # wait for partners only when other requests are in flight: a lone request runs at once
            window_end = head.enqueued + (self.max_wait_s if self._outstanding > 1 else 0.0)
            while (not self._closing and self._ready_images(head.steps) < self.max_batch
                   and loop.time() < window_end and self._queue and self._queue[0] is head):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), window_end - loop.time())
                except (asyncio.TimeoutError, TimeoutError):
                    break
            if not self._queue:
                continue
            batch = await self._live(self._take_batch(), loop)
            if not batch:
                continue
            try:
                await self._execute(batch, loop)
            except Exception as e:  # noqa: BLE001 - a bug here must fail this batch, never stop the collector
                log.exception("batcher of model %s failed on a batch", self.model)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                        job.future.exception()

    async def _live(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> list[Job]:
        """Drop jobs whose caller gave up (deadline, cancellation) or whose client disconnected."""
        live = []
        now = loop.time()
        await asyncio.sleep(0)  # let pending disconnect notifications land first
        for job in batch:
            if job.future.done():
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                job.future.exception()  # mark retrieved: the waiter may already be gone
                continue
            if job.disconnected is not None:
                if job.disconnected():
                    self._m.dropped.labels(self.model, "client_disconnected").inc()
                    job.future.set_exception(ClientGone("client disconnected before its request ran"))
                    job.future.exception()
                    continue
            live.append(job)
        return live

    async def _execute(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        steps = batch[0].steps
        now = loop.time()
        for job in batch:
            self._m.queue_latency.labels(self.model).observe(now - job.enqueued)
        noises = [np.concatenate([j.noises[i] for j in batch], axis=0) for i in range(len(batch[0].noises))]
        labels = None if batch[0].labels is None else np.concatenate([j.labels for j in batch], axis=0)  # type: ignore[misc]
        size = noises[0].shape[0]
        t0 = time.perf_counter()
        try:
            images = await loop.run_in_executor(self._executor, self._run, steps, noises, labels)
            if getattr(images, "shape", (None,))[0] != size or getattr(images, "dtype", None) != np.uint8:
                raise RuntimeError(f"backend returned {getattr(images, 'shape', '?')} {getattr(images, 'dtype', '?')}, "
                                   f"expected {size} uint8 images")
        except Exception as e:  # noqa: BLE001 - a backend failure fails only this batch
            log.exception("backend failure on model %s (batch of %d images)", self.model, size)
            self._m.backend_failures.labels(self.model).inc()
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(BackendFailure(
                        f"the backend of model {self.model!r} failed on this batch: {type(e).__name__}: {e}",
                        headers={"Retry-After": "1"}))
                    job.future.exception()
            return
        dt = time.perf_counter() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * dt
        self._m.compute_latency.labels(self.model, str(steps)).observe(dt)
        self._m.batch_size.labels(self.model).observe(size)
        self._m.backend_runs.labels(self.model, str(steps)).inc()
        self._m.images.labels(self.model).inc(size)
        i = 0
        for job in batch:
            part = images[i:i + job.n]
            i += job.n
            if not job.future.done():
                job.future.set_result(part)

    async def close(self, timeout_s: float) -> None:
        """Stop accepting work, finish what is queued or running (up to timeout_s), then stop the collector."""
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            self._task.cancel()
            for job in list(self._queue):
                if not job.future.done():
                    job.future.set_exception(ShuttingDown("server shut down before the request ran"))
                    job.future.exception()
            self._queue.clear()

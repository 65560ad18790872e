"""Micro-batching (DESIGN.md "Serving contract"): merge queued requests up to max_batch images or max_wait,
run them on the device's worker thread, split the results back.  A request of more than max_batch images runs
as consecutive max_batch chunks (its images' noise is drawn per image, so the pixels are those of one run)."""

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
    dispatched: int = field(default=0, init=False)  # images already handed to a batch (a big job is chunked)
    _out: np.ndarray | None = field(default=None, init=False, repr=False)
    _received: int = field(default=0, init=False, repr=False)

    @property
    def n(self) -> int:
        return int(self.noises[0].shape[0])

    @property
    def remaining(self) -> int:
        """Images not yet handed to a batch."""
        return self.n - self.dispatched

    def fail(self, exc: BaseException) -> None:
        """Answer with `exc` unless already answered; marked retrieved, as the waiter may already be gone."""
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()

    def deliver(self, start: int, images: np.ndarray) -> None:
        """Images [start, start + len) of this job; the future resolves once all n have arrived."""
        if self.future.done():
            return
        if start == 0 and len(images) == self.n:
            self.future.set_result(images)
            return
        if self._out is None:
            self._out = np.empty((self.n, *images.shape[1:]), images.dtype)
        self._out[start:start + len(images)] = images
        self._received += len(images)
        if self._received >= self.n:
            self.future.set_result(self._out)


@dataclass(frozen=True, eq=False)
class Slice:
    """Images [start, stop) of one job, as part of a batch."""

    job: Job
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


class MicroBatcher:
    """A bounded queue per model; one collector task forms batches (same `steps`; labels may differ per image)."""

    def __init__(self, model: str, run: RunFn, executor: Executor, metrics: ServeMetrics, *, max_batch: int,
                 max_wait_s: float, max_queue: int):
        self.model = model
        self._run = run
        self._executor = executor
        self._m = metrics
        self.record_metrics = True  # off while the service warms the request path: /metrics shows served traffic
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
        """Requests waiting in the queue (a request whose batch is running is no longer counted)."""
        return len(self._queue)

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet answered: queued, or in a batch that is running or waits for a worker."""
        return self._outstanding

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
        except TimeoutError:
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

    def _take_batch(self) -> list[Slice]:
        """Slices of the head job and of every later job with the same steps while the batch stays <= max_batch
        images.  A job is taken whole when it fits; one with more than max_batch images left is taken as a
        max_batch chunk (and stays at the head of the queue until its last chunk is taken)."""
        for job in [j for j in self._queue if j.future.done()]:  # answered already (failed chunk, deadline)
            self._queue.remove(job)
        if not self._queue:
            self._m.queue_depth.labels(self.model).set(0)
            return []
        head = self._queue[0]
        batch: list[Slice] = []
        total = 0
        for job in list(self._queue):
            if job.steps != head.steps:
                continue
            take = job.remaining
            if total + take > self.max_batch:
                if batch:
                    break
                take = self.max_batch  # a lone oversized job: its next max_batch images
            batch.append(Slice(job, job.dispatched, job.dispatched + take))
            job.dispatched += take
            total += take
            if total >= self.max_batch:
                break
        for sl in batch:
            if sl.job.remaining == 0:
                self._queue.remove(sl.job)
        self._m.queue_depth.labels(self.model).set(len(self._queue))
        return batch

    def _ready_images(self, steps: int) -> int:
        return sum(j.remaining for j in self._queue if j.steps == steps)

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
                except TimeoutError:
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
                for sl in batch:
                    sl.job.fail(e)

    async def _live(self, batch: list[Slice], loop: asyncio.AbstractEventLoop) -> list[Slice]:
        """Drop slices whose caller gave up (deadline, cancellation) or whose client disconnected."""
        live = []
        now = loop.time()
        await asyncio.sleep(0)  # let pending disconnect notifications land first
        for sl in batch:
            job = sl.job
            if job.future.done():
                continue
            if now > job.deadline:
                self._m.dropped.labels(self.model, "deadline").inc()
                job.fail(DeadlineExceeded("deadline passed while queued"))
                continue
            if job.disconnected is not None:
                if job.disconnected():
                    self._m.dropped.labels(self.model, "client_disconnected").inc()
                    job.fail(ClientGone("client disconnected before its request ran"))
                    continue
            live.append(sl)
        return live

    async def _execute(self, batch: list[Slice], loop: asyncio.AbstractEventLoop) -> None:
        steps = batch[0].job.steps
        now = loop.time()
        for sl in batch:
            if sl.start == 0 and self.record_metrics:  # a chunked job's queue wait ends when its first chunk runs
                self._m.queue_latency.labels(self.model).observe(now - sl.job.enqueued)

        noises = [np.concatenate([s.job.noises[i][s.start:s.stop] for s in batch], axis=0)  # slices are views
                  for i in range(len(batch[0].job.noises))]
        labels = (None if batch[0].job.labels is None
                  else np.concatenate([s.job.labels[s.start:s.stop] for s in batch], axis=0))  # type: ignore[index]
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
            for sl in batch:
                sl.job.fail(BackendFailure(
                    f"the backend of model {self.model!r} failed on this batch: {type(e).__name__}: {e}",
                    headers={"Retry-After": "1"}))
            return
        dt = time.perf_counter() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * dt
        if self.record_metrics:
            self._m.compute_latency.labels(self.model, str(steps)).observe(dt)
            self._m.batch_size.labels(self.model).observe(size)
            self._m.backend_runs.labels(self.model, str(steps)).inc()
            self._m.images.labels(self.model).inc(size)
        i = 0
        for sl in batch:
            sl.job.deliver(sl.start, images[i:i + sl.n])
            i += sl.n

    async def close(self, timeout_s: float) -> None:
        """Stop accepting work, finish what is queued or running (up to timeout_s), then stop the collector."""
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            for job in list(self._queue):
                job.fail(ShuttingDown("server shut down before the request ran"))
            self._queue.clear()

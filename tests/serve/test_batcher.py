"""MicroBatcher semantics on a real event loop and worker thread (run function = an exact, checkable computation)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from quickstep.serve.batcher import Job, MicroBatcher
from quickstep.serve.errors import BackendFailure, DeadlineExceeded, QueueFull, ShuttingDown
from quickstep.serve.metrics import ServeMetrics


class Recorder:
    """run(steps, noises, labels) -> images whose pixels encode (steps, label, noise[0]) so a split is checkable."""

    def __init__(self, delay: float = 0.0, fail_on_steps: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.delay = delay
        self.fail_on_steps = fail_on_steps
        self.lock = threading.Lock()

    def __call__(self, steps, noises, labels):
        with self.lock:
            self.calls.append((steps, noises[0].shape[0]))
        time.sleep(self.delay)
        if steps == self.fail_on_steps:
            raise RuntimeError("boom")
        b = noises[0].shape[0]
        out = np.zeros((b, 1, 1, 3), np.uint8)
        out[:, 0, 0, 0] = steps
        out[:, 0, 0, 1] = labels if labels is not None else 0
        out[:, 0, 0, 2] = noises[0][:, 0, 0, 0].astype(np.uint8)
        return out


def job(steps: int, values: list[int], label: int, timeout: float = 5.0, disconnected=None) -> Job:
    noise = np.array(values, np.float32).reshape(-1, 1, 1, 1)
    return Job(steps=steps, noises=[noise], labels=np.full(len(values), label, np.int64),
               deadline=asyncio.get_running_loop().time() + timeout, disconnected=disconnected)


def run(coro):
    return asyncio.run(coro)


def make(rec: Recorder, **kw) -> MicroBatcher:
    kw = {"max_batch": 8, "max_wait_s": 0.05, "max_queue": 64} | kw
    return MicroBatcher("m", rec, ThreadPoolExecutor(1), ServeMetrics(), **kw)


def test_mixed_steps_and_labels_split_back_correctly():
    rec = Recorder()

    async def main():
        b = make(rec)
        b.start()
        jobs = [job(1, [10, 11], 3), job(2, [20], 4), job(1, [12], 5), job(2, [21, 22, 23], 6), job(1, [13], 7)]
        outs = await asyncio.gather(*(b.submit(j) for j in jobs))
        await b.close(5)
        return jobs, outs

    jobs, outs = run(main())
    for j, o in zip(jobs, outs, strict=True):
        assert o.shape[0] == j.n
        assert (o[:, 0, 0, 0] == j.steps).all() and (o[:, 0, 0, 1] == j.labels).all()
        assert (o[:, 0, 0, 2] == j.noises[0][:, 0, 0, 0]).all()
    assert sorted(rec.calls) == [(1, 4), (2, 4)]  # one batch per step count, labels mixed inside


def test_max_batch_respected_and_oversized_job_runs_alone():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch=4)
        b.start()
        await asyncio.gather(*(b.submit(job(1, [i, i], 0)) for i in range(5)), b.submit(job(1, list(range(6)), 0)))
        await b.close(5)

    run(main())
    assert all(n <= 4 or n == 6 for _, n in rec.calls) and sum(n for _, n in rec.calls) == 16


def test_backend_failure_fails_only_its_batch():
    rec = Recorder(fail_on_steps=2)

    async def main():
        b = make(rec)
        b.start()
        res = await asyncio.gather(b.submit(job(2, [1], 0)), b.submit(job(1, [2], 0)), return_exceptions=True)
        ok = await b.submit(job(1, [3], 0))
        await b.close(5)
        return res, ok

    (bad, good), ok = run(main())
    assert isinstance(bad, BackendFailure) and "boom" in bad.message and bad.status == 503
    assert good.shape == (1, 1, 1, 3) and ok[0, 0, 0, 2] == 3


def test_queue_bound_deadline_and_disconnect():
    rec = Recorder(delay=0.2)

    def gone() -> bool:
        return True

    async def main():
        b = make(rec, max_queue=2, max_wait_s=0.0, max_batch=1)
        b.start()
        first = asyncio.ensure_future(b.submit(job(1, [1], 0)))
        await asyncio.sleep(0.05)  # first is running; the queue is empty again
        dropped = asyncio.ensure_future(b.submit(job(1, [2], 0, disconnected=gone)))
        late = asyncio.ensure_future(b.submit(job(1, [3], 0, timeout=0.01)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as full:
            await b.submit(job(1, [4], 0))
        assert int(full.value.headers["Retry-After"]) >= 1
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await first)[0, 0, 0, 2] == 1
        res = await asyncio.gather(dropped, return_exceptions=True)
        await b.close(5)
        with pytest.raises(ShuttingDown):
            await b.submit(job(1, [5], 0))
        return res

    res = run(main())
    assert res[0].status == 499  # ClientGone: dropped before it ran
    assert [n for _, n in rec.calls] == [1]  # neither the disconnected nor the expired job reached the backend


def test_graceful_close_finishes_queued_work():
    rec = Recorder(delay=0.05)

    async def main():
        b = make(rec, max_batch=1, max_wait_s=0.0)
        b.start()
        futs = [asyncio.ensure_future(b.submit(job(1, [i], 0))) for i in range(4)]
        await asyncio.sleep(0.01)
        await b.close(5)
        return await asyncio.gather(*futs)

    outs = run(main())
    assert [int(o[0, 0, 0, 2]) for o in outs] == [0, 1, 2, 3]

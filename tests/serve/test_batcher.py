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


def test_max_batch_respected_and_oversized_job_split():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch=4)
        b.start()
        big = job(1, list(range(6)), 0)
        outs = await asyncio.gather(*(b.submit(job(1, [i, i], 0)) for i in range(5)), b.submit(big))
        await b.close(5)
        return outs[-1]

    big_out = run(main())
    assert all(n <= 4 for _, n in rec.calls) and sum(n for _, n in rec.calls) == 16, rec.calls
    assert big_out[:, 0, 0, 2].tolist() == list(range(6))  # chunks reassembled in order


def test_request_larger_than_max_batch_runs_in_max_batch_chunks():
    """n = 10 with max_batch = 4: backend runs of 4, 4 and 2 (never 10), results in order; a small request queued
    behind it still gets its images; metrics count every chunk."""
    rec = Recorder()
    metrics = ServeMetrics()

    async def main():
        b = MicroBatcher("m", rec, ThreadPoolExecutor(1), metrics, max_batch=4, max_wait_s=0.0, max_queue=2)
        b.start()
        big, small = job(2, list(range(10, 20)), 7), job(2, [99], 8)
        outs = await asyncio.gather(b.submit(big), b.submit(small))
        await b.close(5)
        return big, outs

    big, (big_out, small_out) = run(main())
    assert max(n for _, n in rec.calls) == 4 and sum(n for _, n in rec.calls) == 11, rec.calls
    assert [n for _, n in rec.calls][:2] == [4, 4]
    assert big_out.shape == (10, 1, 1, 3) and big_out[:, 0, 0, 2].tolist() == list(range(10, 20))
    assert (big_out[:, 0, 0, 1] == 7).all() and (big_out[:, 0, 0, 0] == 2).all()
    assert small_out[:, 0, 0, 2].tolist() == [99] and small_out[0, 0, 0, 1] == 8
    runs = sum(s.value for s in metrics.backend_runs.collect()[0].samples if s.name.endswith("_total"))
    assert runs == len(rec.calls) >= 3


def test_chunked_request_fails_whole_when_a_chunk_fails():
    calls = []

    def flaky(steps, noises, labels):
        calls.append(noises[0].shape[0])
        if len(calls) == 2:
            raise RuntimeError("boom")
        return np.zeros((noises[0].shape[0], 1, 1, 3), np.uint8)

    async def main():
        b = make(flaky, max_batch=2, max_wait_s=0.0)  # type: ignore[arg-type]
        b.start()
        with pytest.raises(BackendFailure, match="boom"):
            await b.submit(job(1, list(range(6)), 0))
        ok = await b.submit(job(1, [1, 2, 3], 0))  # the batcher carries on
        await b.close(5)
        return ok

    assert run(main()).shape == (3, 1, 1, 3)
    assert calls[:2] == [2, 2] and all(n <= 2 for n in calls)


def test_split_request_gives_the_pixels_of_one_run(bundle_dir):
    """A real onnxruntime backend: n = 7 through max_batch = 3 (runs of 3, 3, 1) equals one batch of 7."""
    from quickstep.serve.backends.base import create_backend
    from quickstep.serve.bundle import load_bundle
    from quickstep.serve.service import draw_noise
    from quickstep.serve.settings import ServeSettings

    b = load_bundle(bundle_dir)
    backend = create_backend(b, ServeSettings(backend="onnxruntime", device="cpu", max_batch=3))
    backend.load()
    sizes = []

    def run_fn(steps, noises, labels):
        sizes.append(noises[0].shape[0])
        return backend.run(steps, noises, labels)

    for steps in b.steps_supported:
        noises = draw_noise(1234, 7, b.image_shape, len(b.graphs[steps].noise_inputs))
        whole = backend.run(steps, noises, None)

        async def main(steps=steps, noises=noises):
            mb = MicroBatcher("m", run_fn, ThreadPoolExecutor(1), ServeMetrics(), max_batch=3, max_wait_s=0.0,
                              max_queue=4)
            mb.start()
            out = await mb.submit(Job(steps=steps, noises=noises, labels=None,
                                      deadline=asyncio.get_running_loop().time() + 30))
            await mb.close(5)
            return out

        sizes.clear()
        split = run(main())
        assert sizes == [3, 3, 1]
        np.testing.assert_array_equal(split, whole)


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

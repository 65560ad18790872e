"""Batch buckets of the torch backend (the compiled-GPU fast path), checked on CPU: padding to a bucket never changes
the real rows' pixels, only bucket shapes reach the generator, and warm-up visits every bucket."""

from __future__ import annotations

import numpy as np
import pytest
from quickstep.serve.backends.base import create_backend
from quickstep.serve.backends.buckets import bucket_for, bucket_sizes, pad_rows, split_rows
from quickstep.serve.bundle import load_bundle
from quickstep.serve.service import draw_labels, draw_noise
from quickstep.serve.settings import ServeSettings


def test_bucket_arithmetic():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(0)
    b = bucket_sizes(48)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    with pytest.raises(ValueError, match="exceed the largest batch bucket 48"):
        bucket_for(49, b)
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    p = pad_rows(a, 4)
    assert p.shape == (4, 2) and (p[:3] == a).all() and (p[3] == 0).all() and pad_rows(a, 3) is a
    assert split_rows(10, 4) == [(0, 4), (4, 8), (8, 10)] and split_rows(3, 4) == [(0, 3)]


class _Spy:
    """Wraps a generator: records the batch size of every call."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, *args):
        self.batches.append(int(args[0].shape[0]))
        return self.fn(*args)


@pytest.fixture(scope="module")
def backends(cond_bundle_dir):
    b = load_bundle(cond_bundle_dir)
    plain = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=8, batch_buckets="off"))
    bucketed = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=8, batch_buckets="on"))
    plain.load()
    bucketed.load()
    return b, plain, bucketed


def _request(b, seed: int, n: int, steps: int):
    nn = len(b.graphs[steps].noise_inputs)
    return draw_noise(seed, n, b.image_shape, nn), draw_labels(seed, n, b.num_classes, nn, b.image_shape)


@pytest.mark.parametrize("steps", [1, 2])
def test_padding_never_changes_the_real_rows(backends, steps):
    """Same seed -> same image whatever the bucket: every batch size 1..11 (11 > max_batch splits into 8 + 4) gives
    the unpadded run's pixels exactly, and each row equals that image generated alone."""
    b, plain, bucketed = backends
    spy = bucketed.runner.fns[steps] = _Spy(bucketed.runner.fns[steps])
    alone = {}
    for n in range(1, 12):
        noises, labels = _request(b, 1000 + n, n, steps)
        got = bucketed.run(steps, noises, labels)
        ref = plain.run(steps, noises, labels)
        assert got.shape == ref.shape == (n, *b.image_shape[1:], b.image_shape[0]) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, ref, err_msg=f"batch {n}")
        for i in (0, n - 1):
            one = plain.run(steps, [x[i : i + 1] for x in noises], labels[i : i + 1])
            alone[(n, i)] = int(np.abs(one[0].astype(int) - got[i].astype(int)).max())
        assert got.std() > 0
    assert set(spy.batches) <= set(bucket_sizes(8))  # only bucket shapes reach the generator
    assert max(alone.values()) == 0, alone
    bucketed.runner.fns[steps] = spy.fn


def test_warmup_visits_every_bucket_and_labels_are_required(backends):
    b, _, bucketed = backends
    spies = {s: _Spy(f) for s, f in bucketed.runner.fns.items()}
    bucketed.runner.fns.update(spies)
    try:
        bucketed.warmup()
        for spy in spies.values():
            assert set(spy.batches) == set(bucket_sizes(8)) == {1, 2, 4, 8}
        noises, _ = _request(b, 1, 3, 1)
        with pytest.raises(Exception, match="class_labels are required"):
            bucketed.run(1, noises, None)
    finally:
        bucketed.runner.fns.update({s: spy.fn for s, spy in spies.items()})


def test_settings_validate_the_fast_path_options():
    from pydantic import ValidationError

    s = ServeSettings(backend="torch", torch_compile=True, torch_compile_mode="reduce-overhead",
                      torch_dtype="bfloat16", torch_channels_last=True)
    assert s.batch_buckets == "auto"
    with pytest.raises(ValidationError, match="reduce-overhead"):
        ServeSettings(torch_compile_mode="fast")
    with pytest.raises(ValidationError, match="bfloat16"):
        ServeSettings(torch_dtype="float16")


def test_bf16_channels_last_backend_stays_close(backends):
    """--torch-dtype bfloat16 --torch-channels-last on CPU: the same images to a few uint8 levels."""
    b, plain, _ = backends
    fast = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=8, torch_dtype="bfloat16",
                                           torch_channels_last=True))
    fast.load()
    assert "bfloat16" in fast.fast_path() and "channels_last" in fast.fast_path()
    noises, labels = _request(b, 5, 8, 2)
    diff = np.abs(fast.run(2, noises, labels).astype(int) - plain.run(2, noises, labels).astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())


def test_cli_flags_reach_the_settings():
    from quickstep.serve.cli import main, parse_overrides

    s = ServeSettings(**parse_overrides(["--backend", "torch", "--torch-compile", "--torch-compile-mode",
                                         "reduce-overhead", "--torch-dtype", "bfloat16", "--torch-channels-last",
                                         "--batch-buckets", "on"]))
    assert (s.torch_compile, s.torch_compile_mode, s.torch_dtype, s.torch_channels_last, s.batch_buckets) == (
        True, "reduce-overhead", "bfloat16", True, "on")
    assert main(["--batch-buckets", "sometimes"]) == 2

"""`quickstep bench`: bounded in time and count, sent = succeeded + failed, JSON + histogram PNG."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image
from quickstep.client.bench import BenchConfig, percentile, run_bench
from quickstep.client.cli import main


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 95) == pytest.approx(4.8) and percentile([], 50) is None


def test_bench_counts_failures_by_status_exactly(scripted):
    """Every 3rd request answers 429: with a budget of 12 requests, exactly 4 fail (no retries in bench)."""
    url, state = scripted
    state.every = (3, 429)
    cfg = BenchConfig(url=url, concurrency=(4,), duration_s=30.0, max_requests=12, warmup=0)
    report = asyncio.run(run_bench(cfg))
    (lv,) = report["levels"]
    assert (lv["sent"], lv["succeeded"], lv["failed"], lv["failed_by_status"]) == (12, 8, 4, {"429": 4})
    assert state.hits == 12 and len(lv["latencies_ms"]) == 8
    assert lv["first_error"].startswith("HTTP 429")


def test_bench_is_bounded_in_time(scripted):
    url, state = scripted
    state.delay_s = 0.05
    cfg = BenchConfig(url=url, concurrency=(2,), duration_s=0.5, warmup=0)
    (lv,) = asyncio.run(run_bench(cfg))["levels"]
    assert 0.5 <= lv["elapsed_s"] < 1.5
    assert lv["sent"] == lv["succeeded"] + lv["failed"] and 4 <= lv["sent"] <= 2 * (0.5 / 0.05) + 2


def test_bench_cli_against_real_server_writes_json_and_png(real_server, tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = main(["bench", "--url", real_server.url, "--concurrency", "1,4", "--duration", "0.5", "--max-requests", "30",
               "--n", "2", "--steps", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["sent"] == lv["succeeded"] + lv["failed"] == lv["succeeded"] + sum(lv["failed_by_status"].values())
        assert 1 <= lv["sent"] <= 30 and lv["succeeded"] >= 1
        assert lv["images_per_s"] == pytest.approx(2 * lv["throughput_rps"])
        p = lv["latency_ms"]
        assert 0 < p["min"] <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    assert Image.open(out.with_suffix(".png")).size[0] > 100
    assert "c=4" in capsys.readouterr().out


def test_bench_rejects_bad_levels(capsys):
    assert main(["bench", "--concurrency", "0,2"]) == 1
    assert "comma-separated positive integers" in capsys.readouterr().err


def _generate_body(b64: str) -> dict:
    return {"model": "scripted", "steps": 1, "seed": 0, "latency_ms": 1.0,
            "images": [{"index": 0, "b64": b64, "mime": "image/png"}]}


def test_bench_counts_undecodable_answers_as_failures(scripted):
    """200 answers with bad base64 or bytes that are no image: counted as 'decode_error', the level goes on."""
    import base64

    url, state = scripted
    state.queue += [(200, {}, _generate_body("!!not base64!")),
                    (200, {}, _generate_body(base64.b64encode(b"not an image").decode())),
                    (200, {}, {"model": "scripted", "images": "nope"})]  # no such response shape: bad_response
    cfg = BenchConfig(url=url, concurrency=(1,), duration_s=30.0, max_requests=8, warmup=0)
    (lv,) = asyncio.run(run_bench(cfg))["levels"]
    assert (lv["sent"], lv["succeeded"], lv["failed"]) == (8, 5, 3)
    assert lv["failed_by_status"] == {"bad_response": 1, "decode_error": 2}
    assert lv["sent"] == lv["succeeded"] + sum(lv["failed_by_status"].values())
    assert "decode_error" in lv["first_error"] and state.hits == 8


def test_bench_counts_unexpected_exceptions(scripted, monkeypatch):
    """Whatever a request raises is a failed request with a category, never an aborted bench."""
    from quickstep.client import bench, sdk

    url, _ = scripted
    real = sdk.decode_generate
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("surprise")
        if calls["n"] == 3:
            raise ValueError("raw decoder error")
        return real(*a, **kw)

    monkeypatch.setattr(sdk, "decode_generate", flaky)
    (lv,) = asyncio.run(run_bench(BenchConfig(url=url, concurrency=(2,), duration_s=30.0, max_requests=6,
                                              warmup=0)))["levels"]
    assert (lv["sent"], lv["succeeded"], lv["failed"]) == (6, 4, 2)
    assert lv["failed_by_status"] == {"decode_error": 1, "error:KeyError": 1}
    assert bench.failure_category(sdk.QuickstepError("x", status=200, code="bad_response")) == "bad_response"

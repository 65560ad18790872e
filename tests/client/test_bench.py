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

"""Short load test (issue 12, part 1): a real `quickstep-serve` subprocess, 16 concurrent clients for 8 s.

The full 64-client / 60 s load + 10-minute soak is tests/benchmarks/load_soak.py (same code, bigger numbers).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.benchmarks.load_soak import check_phase, rss_growth, run_phase, server_args, summary_table
from tests.helpers import ServerProcess

MAX_QUEUE, TIMEOUT_S = 8, 5.0


@pytest.fixture(scope="module")
def loaded(rel_bundle, tmp_path_factory):
    """Run the load once; yield (phase result, server log, server alive after the load)."""
    log = tmp_path_factory.mktemp("load") / "server.log"
    with ServerProcess([rel_bundle], server_args(MAX_QUEUE, TIMEOUT_S, max_batch=16, max_wait_ms=5),
                       log_path=log) as srv:
        srv.wait_ready()
        res = asyncio.run(run_phase(srv.url, "load", clients=16, seconds=8.0, max_requests=20_000, rss=srv.rss_kb))
        alive = srv.proc.poll() is None
    print(summary_table([res], MAX_QUEUE, TIMEOUT_S))
    return res, log.read_text(errors="replace"), alive


def test_every_request_answered_without_5xx(loaded):
    res, log, alive = loaded
    assert alive, log[-2000:]
    assert res.sent > 100, f"only {res.sent} requests in 8 s"
    assert check_phase(res, MAX_QUEUE, TIMEOUT_S) == [], summary_table([res], MAX_QUEUE, TIMEOUT_S)
    assert "Traceback" not in log, log[-3000:]


def test_overload_is_shed_with_429(loaded):
    """16 clients against a queue of 8: some requests must have been refused explicitly (and still counted)."""
    res, _, _ = loaded
    assert res.statuses.get("429", 0) > 0, res.statuses
    assert res.metrics_statuses.get("429") == res.statuses["429"]


def test_rss_flat_after_warmup(loaded):
    res, _, _ = loaded
    warm, final, growth = rss_growth([res], warmup_s=2.0)
    assert warm > 0 and growth < 0.05, (warm, final, res.rss_kb)

"""`quickstep bench`: a closed-loop asyncio load generator, bounded in time and request count per level."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .errors import QuickstepError
from .retry import RetryPolicy
from .sdk import AsyncClient


@dataclass(frozen=True)
class BenchConfig:
    """What to send: `concurrency` levels, each for `duration_s` or `max_requests` requests (whichever first)."""

    url: str
    concurrency: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 20.0
    max_requests: int | None = None
    n: int = 1
    steps: int | None = 1
    model: str | None = None
    class_label: int | None = None
    format: str = "png"
    api_key: str | None = None
    timeout_s: float = 60.0
    warmup: int = 1

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        if self.duration_s <= 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class LevelResult:
    """One concurrency level: counts (sent = succeeded + failed), throughput and latency percentiles (ms)."""

    concurrency: int
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_status: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    throughput_rps: float = 0.0
    images_per_s: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    server_latency_ms: dict[str, float | None] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99, mean, min, max of latencies in ms (None when there are none)."""
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {"p50": r(percentile(values, 50)), "p95": r(percentile(values, 95)), "p99": r(percentile(values, 99)),
            "mean": r(sum(values) / len(values)) if values else None, "min": r(min(values, default=None)),
            "max": r(max(values, default=None))}


def failure_category(e: BaseException) -> str:
    """The failed_by_status key of a failed request: the HTTP error status ('429'), else the client error's code
    ('client_timeout', 'connection_failed', 'decode_error', 'bad_response'), else 'decode_error' for an undecodable
    answer, else 'error:<ExceptionType>'."""
    if isinstance(e, QuickstepError):
        return str(e.status) if e.status is not None and e.status >= 400 else e.code
    if isinstance(e, (ValueError, OSError)):  # binascii.Error is a ValueError
        return "decode_error"
    return f"error:{type(e).__name__}"


async def run_level(cfg: BenchConfig, concurrency: int, client: AsyncClient) -> LevelResult:
    """`concurrency` workers, each sending its next request as soon as the previous one answers, until the
    level's deadline or request budget; a request in flight at the deadline completes (bounded by timeout_s)."""
    res = LevelResult(concurrency=concurrency)
    failures: Counter[str] = Counter()
    server_ms: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration_s
    counter = 0

    def claim() -> int | None:
        nonlocal counter
        if time.perf_counter() >= deadline or (cfg.max_requests is not None and counter >= cfg.max_requests):
            return None
        counter += 1
        return counter - 1

    async def worker() -> None:
        while (i := claim()) is not None:
            res.sent += 1
            t = time.perf_counter()
            try:
                out = await client.generate(n=cfg.n, steps=cfg.steps, seed=i, class_label=cfg.class_label,
                                            model=cfg.model, format=cfg.format)
            except Exception as e:  # noqa: BLE001 - every failed request is counted, none aborts the level
                key = failure_category(e)
                failures[key] += 1
                res.failed += 1
                res.first_error = res.first_error or (str(e) if isinstance(e, QuickstepError)
                                                      else f"{key}: {type(e).__name__}: {e}")
                continue
            res.latencies_ms.append((time.perf_counter() - t) * 1000.0)
            server_ms.append(out.latency_ms)
            res.succeeded += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed_s = time.perf_counter() - t0
    res.failed_by_status = dict(sorted(failures.items()))
    res.throughput_rps = res.succeeded / res.elapsed_s
    res.images_per_s = res.succeeded * cfg.n / res.elapsed_s
    res.latency_ms = summarize(res.latencies_ms)
    res.server_latency_ms = summarize(server_ms)
    res.latencies_ms = [round(x, 3) for x in res.latencies_ms]
    return res


async def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Every level in turn on one connection pool, without retries (a 429 counts as a failure)."""
    limits = httpx.Limits(max_connections=max(cfg.concurrency), max_keepalive_connections=max(cfg.concurrency))
    async with httpx.AsyncClient(limits=limits) as http:
        client = AsyncClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout_s, retry=RetryPolicy.none(),
                             http_client=http)
        health = await client.health()
        if not health.ready:
            raise QuickstepError(f"{cfg.url} is not ready (status {health.status!r})", code="not_ready")
        for i in range(cfg.warmup):  # connection set-up and lazy server work stay out of the numbers
            await client.generate(n=cfg.n, steps=cfg.steps, seed=i, class_label=cfg.class_label, model=cfg.model,
                                  format=cfg.format)
        levels = [await run_level(cfg, c, client) for c in cfg.concurrency]
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "levels": [asdict(lv) for lv in levels]}


def histogram_path(json_path: Path) -> Path:
    """bench.json -> bench.png (next to it)."""
    return json_path.with_suffix(".png")


def plot_histogram(report: dict[str, Any], path: Path) -> Path:
    """A latency histogram (log-spaced bins, one series per concurrency level) as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise RuntimeError("the latency histogram needs matplotlib: pip install 'quickstep[client]'") from e
    lat = [x for lv in report["levels"] for x in lv["latencies_ms"] if x > 0]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if lat:
        lo, hi = min(lat), max(lat)
        hi = hi * 1.01 if hi > lo else lo * 1.5 + 1e-3
        edges = [lo * (hi / lo) ** (k / 40) for k in range(41)]
        for lv in report["levels"]:
            if lv["latencies_ms"]:
                p = lv["latency_ms"]
                ax.hist(lv["latencies_ms"], bins=edges, alpha=0.55,
                        label=f"c={lv['concurrency']}: p50 {p['p50']:.1f} p99 {p['p99']:.1f} ms, "
                              f"{lv['throughput_rps']:.1f} req/s")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"quickstep bench {report['config']['url']} (n={report['config']['n']}, "
                 f"steps={report['config']['steps']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """bench.json and bench.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out, plot_histogram(report, histogram_path(out))

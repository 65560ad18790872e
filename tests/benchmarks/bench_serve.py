"""Serving benchmark on CPU (issue 6 closing note), digits-sized model with random weights.

    .venv/bin/python tests/benchmarks/bench_serve.py [--seconds 5] [--requests 200] [--max-wait-ms 5]

Prints p50/p99 latency of one 1-step image through the onnxruntime backend alone and over HTTP (a
`quickstep-serve` subprocess on 127.0.0.1), and throughput (images/s) with 1 and 32 concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def digits_checkpoint(root: Path) -> Path:
    """UNet model_channels=32, mult (1,2), attention at 8x8, 16x16 images, 10 classes, seeded random weights."""
    import torch
    from quickstep.train.core import ModelConfig, UNetConfig, build_model
    from quickstep.train.core.checkpoint import save_checkpoint

    from tests.helpers import perturb_zero_init

    cfg = ModelConfig(backbone=UNetConfig(img_channels=1, img_resolution=16, model_channels=32, channel_mult=(1, 2),
                                          attn_resolutions=(8,), num_classes=10))
    torch.manual_seed(0)
    model = perturb_zero_init(build_model(cfg)).eval()
    extra = {"kind": "consistency", "name": "digits-random",
             "data": {"name": "digits", "kind": "image", "shape": [1, 16, 16], "num_classes": 10}}
    return save_checkpoint(root / "ckpt", model, extra_config=extra)


def pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_backend(bundle: Path, n: int) -> tuple[float, float, dict[int, float]]:
    from quickstep.serve.backends.base import create_backend
    from quickstep.serve.bundle import load_bundle
    from quickstep.serve.service import draw_noise
    from quickstep.serve.settings import ServeSettings

    b = load_bundle(bundle)
    be = create_backend(b, ServeSettings(max_batch=32))
    be.load()
    be.warmup()
    times = []
    for i in range(n):
        noise = draw_noise(i, 1, b.image_shape, 1)
        labels = np.array([i % 10], np.int64)
        t0 = time.perf_counter()
        be.run(1, noise, labels)
        times.append(time.perf_counter() - t0)
    per_batch = {}
    for bsz in (8, 32):
        noise = draw_noise(0, bsz, b.image_shape, 1)
        labels = np.arange(bsz, dtype=np.int64) % 10
        ts = []
        for _ in range(max(5, n // bsz)):
            t0 = time.perf_counter()
            be.run(1, noise, labels)
            ts.append(time.perf_counter() - t0)
        per_batch[bsz] = pct(ts)[0]
    return (*pct(times), per_batch)


async def bench_http(url: str, n: int) -> tuple[float, float]:
    """p50/p99 (ms) of one 1-step image as raw PNG over a keep-alive connection, one request at a time."""
    host, port = url.split("//")[1].split(":")
    conn = RawConnection(host, int(port))
    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            status, _ = await conn.post_json("/v1/generate", b'{"seed": %d, "class_label": %d}' % (i, i % 10),
                                             extra=b"Accept: image/png\r\n")
            times.append(time.perf_counter() - t0)
            assert status == 200
    finally:
        conn.close()
    return pct(times)


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: the load generator must cost far less CPU than
    the server it measures (httpx with 32 connections does not, on 2 cores)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: bytes, extra: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), extra, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def throughput(url: str, clients: int, seconds: float) -> tuple[float, float]:
    """images/s and p50 latency (ms) with `clients` closed-loop clients, each sending n=1 JSON requests."""
    host, port = url.split("//")[1].split(":")
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        conn = RawConnection(host, int(port))
        i = 0
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                status, _ = await conn.post_json("/v1/generate", b'{"seed": %d, "class_label": %d}' % (k * 100000 + i,
                                                                                                      i % 10))
                assert status == 200, status
                lat.append(time.perf_counter() - t0)
                i += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    return len(lat) / wall, pct(lat)[0]


def batch_stats(url: str) -> tuple[float, float]:
    """(images, backend runs) so far, from the server's /metrics batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    total = runs = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for smp in fam.samples:
            if smp.name == "quickstep_batch_size_images_sum":
                total += smp.value
            elif smp.name == "quickstep_batch_size_images_count":
                runs += smp.value
    return total, runs


def start_server(bundle: Path, port: int, max_wait_ms: float) -> subprocess.Popen:
    env = {**os.environ, "QUICKSTEP_UI": "false", "QUICKSTEP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "quickstep.serve.cli", "--bundle", str(bundle), "--port", str(port),
                             "--max-wait-ms", str(max_wait_ms)], env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("server did not become ready")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    args = ap.parse_args()
    from quickstep.export.bundle import export_bundle

    from tests.helpers import free_port

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = export_bundle(digits_checkpoint(root), root / "bundle", steps=(1, 2))
        print(f"digits-sized model (UNet 32ch, mult (1,2), attn 8, 16x16, 10 classes), cpu cores={os.cpu_count()}")
        p50, p99, per_batch = bench_backend(bundle, args.requests)
        print(f"backend call alone (onnxruntime, 1 image, 1 step):  p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        for bsz, ms in per_batch.items():
            print(f"backend call alone, batch {bsz:2d}: p50 {ms:.2f} ms ({ms / bsz:.2f} ms/image)")
        port = free_port()
        proc = start_server(bundle, port, args.max_wait_ms)
        url = f"http://127.0.0.1:{port}"
        try:
            p50, p99 = asyncio.run(bench_http(url, args.requests))
            print(f"HTTP POST /v1/generate (raw PNG, max_wait_ms={args.max_wait_ms:g}): p50 {p50:.2f} ms  p99 {p99:.2f} ms")
            for clients in (1, 32):
                b0 = batch_stats(url)
                ips, lat50 = asyncio.run(throughput(url, clients, args.seconds))
                b1 = batch_stats(url)
                mean_batch = (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
                print(f"throughput, {clients:2d} concurrent client(s): {ips:7.1f} images/s  (p50 latency {lat50:.1f} ms, "
                      f"mean batch {mean_batch:.1f} images)")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()

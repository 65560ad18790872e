"""Serving benchmark (issue 6 closing note; issue 21 for the GPU), digits-sized model with random weights or --bundle.

    .venv/bin/python tests/benchmarks/bench_serve.py [--seconds 5] [--requests 200] [--max-wait-ms 5]
        [--batching on,off] [--max-batch 32] [--threads N] [--backend torch --device cuda --bundle DIR]
        [--server-arg=--torch-dtype=bfloat16 ...] [--json out.json]

Prints p50/p99 latency of one 1-step image through the onnxruntime backend alone and over HTTP (a
`quickstep-serve` subprocess on 127.0.0.1), and throughput (images/s) with 1 and 32 concurrent clients, for each
batching mode ("on": --max-batch/--max-wait-ms; "off": max_batch 1, max_wait_ms 0).  Besides wall time it reports
CPU time per request (the server process's utime+stime from /proc, and the backend call's process CPU time): on a
shared, loaded machine the wall-clock difference HTTP - backend is inflated by time-sharing, the CPU-time
difference is the work HTTP adds (parsing, validation, batcher hand-off, PNG encoding, response).
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


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_thread_cpu_s(pid: int) -> float:
    """utime + stime of the server's backend worker threads (named quickstep-cpu*/quickstep-cuda*), seconds."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith(("quickstep-cpu", "quickstep-cuda")):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


BACKEND_CPU_MS: list[float] = []  # process CPU ms per 1-image backend call (filled by bench_backend)


def settings_overrides(server_args: list[str]) -> dict:
    """quickstep-serve flags (--torch-dtype=bfloat16 ...) -> ServeSettings fields, so the in-process backend call runs
    exactly what the server runs."""
    from quickstep.serve.cli import parse_overrides

    return parse_overrides(server_args)


def bench_backend(bundle: Path, n: int, threads: int = 0, **settings: object) -> tuple[float, float, dict[int, float]]:
    from quickstep.serve.backends.base import create_backend
    from quickstep.serve.bundle import load_bundle
    from quickstep.serve.service import draw_noise
    from quickstep.serve.settings import ServeSettings

    b = load_bundle(bundle)
    be = create_backend(b, ServeSettings(**{"max_batch": 32, "intra_op_threads": threads, **settings}))
    be.load()
    be.warmup()
    times = []
    BACKEND_CPU_MS.clear()
    for i in range(n):
        noise = draw_noise(i, 1, b.image_shape, 1)
        labels = np.array([i % 10], np.int64)
        t0, c0 = time.perf_counter(), time.process_time()
        be.run(1, noise, labels)
        times.append(time.perf_counter() - t0)
        BACKEND_CPU_MS.append(1e3 * (time.process_time() - c0))
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


def _v2_json(i: int) -> bytes:
    return (b'{"inputs":[{"name":"seed","shape":[1],"datatype":"INT64","data":[%d]},'
            b'{"name":"class_label","shape":[1],"datatype":"INT64","data":[%d]}]}' % (i, i % 10))


def _v2_binary(i: int) -> tuple[bytes, bytes]:
    head = (b'{"inputs":[{"name":"seed","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}},'
            b'{"name":"class_label","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}}],'
            b'"outputs":[{"name":"images","parameters":{"binary_data":true}}]}')
    tail = np.array([i], "<i8").tobytes() + np.array([i % 10], "<i8").tobytes()
    return head + tail, b"Inference-Header-Content-Length: %d\r\n" % len(head)


# one 1-step image per request, class i % 10, seed i: (path, body and extra headers of request i)
ROUTES = {
    "/v1/generate JSON": lambda i: ("/v1/generate", b'{"seed": %d, "class_label": %d}' % (i, i % 10), b""),
    "/v1/generate raw PNG": lambda i: ("/v1/generate", b'{"seed": %d, "class_label": %d}' % (i, i % 10),
                                       b"Accept: image/png\r\n"),
    "/v1/images/generations": lambda i: ("/v1/images/generations",
                                         b'{"prompt": "%d", "seed": %d}' % (i % 10, i), b""),
    "/v2 infer JSON": lambda i: ("/v2/models/digits-random/infer", _v2_json(i), b""),
    "/v2 infer binary": lambda i: ("/v2/models/digits-random/infer", *_v2_binary(i)),
}


async def bench_route(url: str, route: str, n: int) -> tuple[float, float]:
    """p50/p99 (ms) of `n` sequential one-image requests on one keep-alive connection."""
    host, port = url.split("//")[1].split(":")
    conn = RawConnection(host, int(port))
    times = []
    try:
        for i in range(n):
            path, body, extra = ROUTES[route](i)
            t0 = time.perf_counter()
            status, _ = await conn.post_json(path, body, extra=extra)
            times.append(time.perf_counter() - t0)
            assert status == 200, (route, status)
    finally:
        conn.close()
    return pct(times)


def bench_routes(url: str, pid: int, n: int, repeats: int) -> dict[str, tuple[float, ...]]:
    """Every route of ROUTES, interleaved round by round (so load drift on a shared machine hits all alike):
    {route: (median p50, median p99, median server CPU ms per request, median CPU ms per request outside the
    backend worker thread)} over `repeats` rounds.  The last is the HTTP/service work itself (parsing, validation,
    noise, batcher hand-off, encoding, response), the figure least distorted by other load on the machine."""
    rows: dict[str, list[tuple[float, ...]]] = {r: [] for r in ROUTES}
    for route in ROUTES:
        asyncio.run(bench_route(url, route, 20))  # warm each route's path once
    for _ in range(repeats):
        for route in ROUTES:
            c0, b0 = proc_cpu_s(pid), backend_thread_cpu_s(pid)
            p50, p99 = asyncio.run(bench_route(url, route, n))
            c1, b1 = proc_cpu_s(pid), backend_thread_cpu_s(pid)
            rows[route].append((p50, p99, 1e3 * (c1 - c0) / n, 1e3 * ((c1 - c0) - (b1 - b0)) / n))
    return {r: tuple(float(np.median([x[k] for x in v])) for k in range(4)) for r, v in rows.items()}


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


def start_server(bundle: Path, port: int, max_wait_ms: float, max_batch: int = 32, threads: int = 0,
                 extra: list[str] | None = None, ready_s: float = 120) -> subprocess.Popen:
    env = {**os.environ, "QUICKSTEP_UI": "false", "QUICKSTEP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "quickstep.serve.cli", "--bundle", str(bundle), "--port", str(port),
                             "--max-wait-ms", str(max_wait_ms), "--max-batch", str(max_batch),
                             "--intra-op-threads", str(threads), "--no-ui", *(extra or [])], env=env)
    deadline = time.monotonic() + ready_s
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
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batching", default="on", help="comma list of modes: on (max-batch/max-wait-ms), off (1/0)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads, backend and server (0 = "
                    "runtime default)")
    ap.add_argument("--clients", default="1,32", help="comma list of concurrent client counts")
    ap.add_argument("--route-requests", type=int, default=200, help="requests per route and round (0: skip the "
                    "per-route overhead table)")
    ap.add_argument("--route-repeats", type=int, default=5, help="rounds of the per-route table (medians)")
    ap.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "aoti", "tensorrt"))
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--bundle", type=Path, default=None, help="serve this bundle (default: a random digits one)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra quickstep-serve flag (repeatable; "
                    "also applied to the in-process backend call), e.g. --server-arg=--torch-dtype=bfloat16")
    ap.add_argument("--ready-s", type=float, default=120.0, help="longest wait for the server to become ready")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    modes = [m for m in args.batching.split(",") if m]
    if any(m not in ("on", "off") for m in modes):
        raise SystemExit(f"--batching takes a comma list of on/off, got {args.batching!r}")
    from quickstep.export.bundle import export_bundle

    from tests.helpers import free_port

    server_args = ["--backend", args.backend, "--device", args.device, *args.server_arg]
    overrides = settings_overrides(server_args)
    out: dict = {"backend": args.backend, "device": args.device, "server_args": server_args, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = args.bundle or export_bundle(digits_checkpoint(root), root / "bundle", steps=(1, 2))
        what = "given" if args.bundle else "digits-sized UNet 32ch, mult (1,2), attn 8, 16x16, 10 classes, random weights"
        print(f"bundle {bundle.name} ({what}), server {' '.join(server_args)}, cpu cores={os.cpu_count()}, "
              f"onnxruntime threads={args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}")
        p50, p99, per_batch = bench_backend(bundle, args.requests, args.threads, **overrides)
        be_cpu = float(np.median(BACKEND_CPU_MS))
        out["backend_call"] = {"p50_ms": p50, "p99_ms": p99, "cpu_p50_ms": be_cpu,
                               "batch_p50_ms": {str(k): v for k, v in per_batch.items()}}
        print(f"backend call alone ({args.backend} on {args.device}, 1 image, 1 step):  p50 {p50:.2f} ms  "
              f"p99 {p99:.2f} ms  (CPU time p50 {be_cpu:.2f} ms)")
        for bsz, ms in per_batch.items():
            print(f"backend call alone, batch {bsz:2d}: p50 {ms:.2f} ms ({ms / bsz:.2f} ms/image)")
        for mode in modes:
            max_batch, max_wait = (args.max_batch, args.max_wait_ms) if mode == "on" else (1, 0.0)
            port = free_port()
            proc = start_server(bundle, port, max_wait, max_batch, args.threads, server_args, args.ready_s)
            rec: dict = out["modes"].setdefault(mode, {"max_batch": max_batch, "max_wait_ms": max_wait})
            url = f"http://127.0.0.1:{port}"
            try:
                asyncio.run(bench_http(url, 20))  # warm the connection path
                c0 = proc_cpu_s(proc.pid)
                h50, h99 = asyncio.run(bench_http(url, args.requests))
                srv_cpu = 1e3 * (proc_cpu_s(proc.pid) - c0) / args.requests
                print(f"[batching {mode}: max_batch={max_batch}, max_wait_ms={max_wait:g}]")
                print(f"HTTP POST /v1/generate (raw PNG, 1 client): p50 {h50:.2f} ms  p99 {h99:.2f} ms; "
                      f"wall overhead over the backend call p50 {h50 - p50:+.2f} ms")
                print(f"server CPU time per request {srv_cpu:.2f} ms = backend {be_cpu:.2f} ms + HTTP/service "
                      f"{srv_cpu - be_cpu:+.2f} ms")
                rec.update(http_p50_ms=h50, http_p99_ms=h99, http_overhead_p50_ms=h50 - p50,
                           server_cpu_ms_per_request=srv_cpu, http_cpu_overhead_ms=srv_cpu - be_cpu)
                if args.route_requests and mode == modes[0]:
                    table = bench_routes(url, proc.pid, args.route_requests, args.route_repeats)
                    print(f"per route, 1 image, 1 client, median of {args.route_repeats} interleaved rounds of "
                          f"{args.route_requests} (load average {os.getloadavg()[0]:.1f}; shared machine):")
                    print(f"{'route':<24} {'p50 ms':>7} {'p99 ms':>7} {'overhead p50':>13} {'overhead p99':>13} "
                          f"{'vs /v1/generate p50':>20} {'p99':>7} {'server CPU ms':>14} {'non-backend CPU':>16} "
                          f"{'vs /v1/generate':>16}")
                    ref50, ref99, _, ref_cpu = table["/v1/generate JSON"]
                    for route, (r50, r99, cpu, http_cpu) in table.items():
                        print(f"{route:<24} {r50:7.2f} {r99:7.2f} {r50 - p50:+13.2f} {r99 - p99:+13.2f} "
                              f"{r50 - ref50:+20.2f} {r99 - ref99:+7.2f} {cpu:14.2f} {http_cpu:16.2f} "
                              f"{http_cpu - ref_cpu:+16.2f}")
                for clients in (int(c) for c in args.clients.split(",")):
                    b0 = batch_stats(url)
                    ips, lat50 = asyncio.run(throughput(url, clients, args.seconds))
                    b1 = batch_stats(url)
                    mean_batch = (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
                    print(f"throughput, {clients:2d} concurrent client(s): {ips:7.1f} images/s  (p50 latency "
                          f"{lat50:.1f} ms, mean batch {mean_batch:.1f} images)")
                    rec[f"clients_{clients}"] = {"images_per_s": ips, "p50_ms": lat50, "mean_batch": mean_batch}
            finally:
                proc.terminate()
                proc.wait(30)
    if args.json:
        import json

        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Generation benchmark (issue 13, item 1): images/s and latency of the teacher's 35-NFE Heun sampler in torch eager
(what a user runs today) and of the sCM 1-/2-step generators in torch eager, torch.compile, AOTInductor,
onnxruntime (CPU; CUDA and TensorRT execution providers when present) and native TensorRT, at batch 1/8/64/256,
for the digits model and a CIFAR-sized (32x32x3, ~35M-parameter DDPM++-like) U-Net with random weights.

Each row gives the ratio to the teacher-eager baseline at the same batch (images/s) and the fraction of the
roofline: model FLOPs (torch.utils.flop_counter.FlopCounterMode, per network evaluation) x NFE / the device's
matmul rate measured here (fp32 on CPU, bf16 on CUDA).  Not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_generation.py                       # everything available
    .venv/bin/python tests/benchmarks/bench_generation.py --models digits --batches 1,8,64,256 \\
        --backends eager-heun,eager,compile,aoti,ort --compile-batches 1,8,64 --threads 1
    .venv/bin/python tests/benchmarks/bench_generation.py --models cifar --batches 1,8,64,256 \\
        --backends eager-heun,eager,ort --max-call-s 20                         # CPU: big cells extrapolated

A cell whose single call would exceed --max-call-s (predicted from one network evaluation at that batch, or
linearly from the largest smaller batch measured) is not run: its time is NFE x the per-evaluation time and the
row says "extrapolated".  Cells whose repeats would exceed --cell-budget-s are timed once ("1 rep").
--precision takes a comma list: fp32, bf16 (autocast; the CUDA default) and bf16w (bfloat16 weights, no autocast:
train.core.generator.inference_copy); --channels-last runs every torch path NHWC.  On CUDA compile uses
mode="reduce-overhead" (CUDA graphs; --compile-mode), --compile-dynamic compiles one graph for every batch (the
device suite's time budget); AOTInductor is fp32 or bf16w (one package, dynamic batch); onnxruntime CUDA/TensorRT
use the fp16 (half-compute) ONNX graph; native TensorRT engines are built from the same fp16 graph with one profile
per batch.  The roofline on CUDA is the measured bf16 matmul rate whatever the precision.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from quickstep.train.core import ModelConfig, UNetConfig, build_model
from quickstep.train.core.generator import ConsistencyGenerator, HeunGenerator, inference_copy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HEUN_STEPS = 18  # 2 * 18 - 1 = 35 network evaluations
MODELS: dict[str, ModelConfig] = {
    # the shipped digits preset (serve/bench_serve, export/bench_export use the same network)
    "digits": ModelConfig(UNetConfig(img_channels=1, img_resolution=16, model_channels=32, channel_mult=(1, 2),
                                     num_blocks=1, attn_resolutions=(8,), num_classes=10)),
    # CIFAR-sized 32x32x3 network of ~35M parameters (35.3M, 14.8 GFLOP per image per evaluation): DDPM++-like
    # (128 channels, attention at 16x16) with mult (1,2,2) and 3 blocks; EDM's DDPM++ (mult (2,2,2), 4 blocks)
    # would be 56M parameters / 38 GFLOP in this UNet
    "cifar": ModelConfig(UNetConfig(img_channels=3, img_resolution=32, model_channels=128, channel_mult=(1, 2, 2),
                                    num_blocks=3, attn_resolutions=(16,), num_classes=0)),
}
BACKENDS = ("eager-heun", "eager", "compile", "aoti", "ort", "ort-cuda", "ort-trt", "tensorrt")
PRECISIONS = ("fp32", "bf16", "bf16w")  # bf16 = autocast over float32 weights, bf16w = bfloat16 weights


# ----------------------------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK: Callable[[], float] = time.perf_counter  # time.process_time with --clock cpu (robust on a loaded CPU)
WALL: list[float] = []  # wall seconds of the last time_calls (reported next to CPU time)


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Seconds (CLOCK) of `repeats` calls of fn() after `warmup` calls (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    WALL.clear()
    for _ in range(repeats):
        w0, t0 = time.perf_counter(), CLOCK()
        fn()
        sync(device)
        out.append(CLOCK() - t0)
        WALL.append(time.perf_counter() - w0)
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product in `dtype`: the roofline's compute peak."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 20 if device.type == "cuda" else 1

    def run():
        for _ in range(inner):
            torch.mm(a, b)

    t = min(time_calls(run, repeats, device, warmup=2))
    return 2.0 * n**3 * inner / t


def ort_matmul_rate(n: int = 1024, threads: int = 1, repeats: int = 5) -> float:
    """Measured fp32 MatMul rate (FLOP/s) of onnxruntime's CPU kernels (MLAS uses AVX-512 where torch's CPU
    build may not): on a CPU the roofline's peak is the better of this and torch.mm."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", vi[:2], vi[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((n, n), dtype=np.float32) for k in "ab"}
    t = min(time_calls(lambda: sess.run(None, feeds), repeats, torch.device("cpu"), warmup=2))
    return 2.0 * n**3 / t


def model_flops(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> float:
    """FLOPs of one network evaluation per image (FlopCounterMode counts matmuls/convolutions as 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    b = 2
    x = torch.randn(b, *cfg.sample_shape, device=device)
    t = torch.full((b,), 1.0, device=device)
    y = torch.zeros(b, dtype=torch.long, device=device) if cfg.num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, t, y)
    return fc.get_total_flops() / b


# ----------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    model: str
    method: str  # "heun35", "scm1", "scm2"
    backend: str
    precision: str
    batch: int
    latency_ms: float | None = None
    images_per_s: float | None = None
    note: str = ""  # "", "1 rep", "extrapolated ...", "skipped: ..."
    vs_teacher: float | None = None
    roofline_frac: float | None = None
    extra: dict = field(default_factory=dict)


def nfe(method: str) -> int:
    return {"heun35": 2 * HEUN_STEPS - 1, "scm1": 1, "scm2": 2}[method]


@dataclass
class Inputs:
    noise: list[torch.Tensor]  # N(0, I) [B, C, H, W], one per step
    labels: torch.Tensor | None

    def numpy_feeds(self, steps: int) -> dict[str, np.ndarray]:
        feeds = {"noise": self.noise[0].cpu().numpy()}
        for k in range(1, steps):
            feeds[f"noise{k + 1}"] = self.noise[k].cpu().numpy()
        if self.labels is not None:
            feeds["class_labels"] = self.labels.cpu().numpy()
        return feeds


def make_inputs(cfg: ModelConfig, batch: int, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(batch, *cfg.sample_shape, generator=g).to(device) for _ in range(2)]
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device) if cfg.num_classes else None
    return Inputs(noise, labels)


class Bench:
    """Runs the cells of one model: budgets, extrapolation, one row per (method, backend, batch)."""

    def __init__(self, name: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device, tmp: Path,
                 precision: str = "fp32"):
        self.name, self.cfg, self.args, self.device, self.tmp = name, cfg, args, device, tmp
        self.precision = precision
        torch.manual_seed(0)
        from tests.helpers import perturb_zero_init

        self.model = perturb_zero_init(build_model(cfg)).eval().requires_grad_(False).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.flops = model_flops(self.model, cfg, device)
        if precision == "bf16w" or args.channels_last:
            self.model = inference_copy(self.model, channels_last=args.channels_last,
                                        dtype=torch.bfloat16 if precision == "bf16w" else None)
        self.bf16 = precision == "bf16"  # autocast
        self.nfe_s: dict[int, float] = {}  # batch -> seconds of one eager network evaluation
        self.rows: list[Row] = []
        self._onnx: dict[tuple[int, str], Path] = {}

    # -- helpers -----------------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def torch_precision(self) -> str:
        label = {"fp32": "fp32", "bf16": "bf16-autocast", "bf16w": "bf16-weights"}[self.precision]
        return label + ("+NHWC" if self.args.channels_last else "")

    def one_nfe(self, batch: int) -> float | None:
        """Median seconds of one eager network evaluation (denoise) at `batch`; None when predicted too slow."""
        if batch in self.nfe_s:
            return self.nfe_s[batch]
        pred = self.predicted_nfe(batch)
        if pred is not None and pred > self.args.max_call_s:
            return None
        inp = make_inputs(self.cfg, batch, self.device)
        sigma = torch.full((batch,), 2.0, device=self.device)

        def f():
            with torch.no_grad(), self.autocast():
                self.model.denoise(inp.noise[0], sigma, inp.labels)

        reps = 3 if (pred or 0) * 4 < self.args.cell_budget_s else 1
        self.nfe_s[batch] = statistics.median(time_calls(f, reps, self.device, warmup=1))
        return self.nfe_s[batch]

    def predicted_nfe(self, batch: int) -> float | None:
        """Linear-in-batch prediction from the largest measured smaller batch (None if nothing measured)."""
        smaller = [b for b in self.nfe_s if b <= batch]
        if not smaller:
            return None
        b0 = max(smaller)
        return self.nfe_s[b0] * batch / b0

    def measure(self, row: Row, fn: Callable[[], object], call_estimate_s: float | None) -> Row:
        """Time fn (repeats within the cell budget), or extrapolate from one NFE when one call is too slow."""
        a = self.args
        if call_estimate_s is not None and call_estimate_s > a.max_call_s:
            return self.extrapolate(row, f"one call ~{call_estimate_s:.0f} s > --max-call-s")
        if call_estimate_s is not None and call_estimate_s * (a.repeats + 1) > a.cell_budget_s:
            times = time_calls(fn, 1, self.device, warmup=1)
            row.note = "1 rep"
        else:
            times = time_calls(fn, a.repeats, self.device, warmup=2)
        row.latency_ms = 1e3 * statistics.median(times)
        row.images_per_s = row.batch / (row.latency_ms / 1e3)
        if CLOCK is not time.perf_counter:
            row.extra["wall_ms"] = round(1e3 * statistics.median(WALL), 2)
        return row

    def extrapolate(self, row: Row, why: str) -> Row:
        """Torch eager: NFE x the measured (or linearly predicted) time of one network evaluation at this batch.
        Other backends: linear in batch from the same backend's largest smaller measured batch."""
        if row.backend not in ("eager-heun", "eager"):
            prev = [r for r in self.rows if (r.method, r.backend) == (row.method, row.backend) and r.latency_ms
                    and not r.note.startswith("extrapolated") and r.batch < row.batch]
            if not prev:
                return self.skip(row, why)
            p = max(prev, key=lambda r: r.batch)
            row.latency_ms = p.latency_ms * row.batch / p.batch
            row.images_per_s = row.batch / (row.latency_ms / 1e3)
            row.note = f"extrapolated (own b{p.batch} time, linear in batch; {why})"
            return row
        per = self.one_nfe(row.batch)
        how = f"1 NFE at b{row.batch}"
        if per is None:
            per = self.predicted_nfe(row.batch)
            b0 = max(b for b in self.nfe_s if b <= row.batch)
            how = f"1 NFE at b{b0}, linear in batch"
        row.latency_ms = 1e3 * per * nfe(row.method)
        row.images_per_s = row.batch / (row.latency_ms / 1e3)
        row.note = f"extrapolated ({how}; {why})"
        return row

    def skip(self, row: Row, why: str) -> Row:
        row.note = f"skipped: {why}"
        return row

    def onnx_path(self, steps: int, precision: str) -> Path:
        """generator_{steps}step.onnx for this model (fp32 or fp16 half-compute), exported once."""
        key = (steps, precision)
        if key not in self._onnx:
            from quickstep.export.onnx import consistency_graph, export_onnx

            # a CPU copy: moving self.model would change the parameter addresses CUDA graphs were recorded with
            spec = consistency_graph(copy.deepcopy(self.model).cpu(), steps)
            path = self.tmp / f"{self.name}_{steps}step_{precision}.onnx"
            export_onnx(spec, path, fp16=precision == "fp16", num_classes=self.cfg.num_classes)
            self._onnx[key] = path
        return self._onnx[key]

    # -- cells -------------------------------------------------------------------------------------------------
    def run_all(self, on_row: Callable[[], None] | None = None) -> list[Row]:
        a = self.args
        for b in a.batches:
            for backend in a.backends:
                methods = ["heun35"] if backend == "eager-heun" else [f"scm{s}" for s in a.steps]
                for method in methods:
                    row = Row(self.name, method, backend, "", b)
                    try:
                        self.cell(row)
                    except Exception as e:  # noqa: BLE001 - a failing backend is a row, not a crash
                        row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    self.rows.append(row)
                    print(format_row(row, self), flush=True)
                    if on_row is not None:
                        on_row()
        return self.rows

    def cell(self, row: Row) -> Row:
        b, a = row.batch, self.args
        steps = nfe(row.method) if row.method != "heun35" else 0
        inp = make_inputs(self.cfg, b, self.device)
        per = self.one_nfe(b) if row.backend in ("eager-heun", "eager") else None
        est = None if per is None and self.predicted_nfe(b) is None else (per or self.predicted_nfe(b)) * nfe(
            row.method)
        if row.backend == "eager-heun":
            row.precision = self.torch_precision()
            gen = HeunGenerator(self.model, HEUN_STEPS).eval()
            args_ = [inp.noise[0]] + ([inp.labels] if inp.labels is not None else [])

            def heun():
                with torch.no_grad(), self.autocast():
                    return gen(*args_).cpu()

            return self.measure(row, heun, est)
        gen = ConsistencyGenerator(self.model, steps).eval()
        targs = inp.noise[:steps] + ([inp.labels] if inp.labels is not None else [])
        if row.backend == "eager":
            row.precision = self.torch_precision()

            def eager():
                with torch.no_grad(), self.autocast():
                    return gen(*targs).cpu()

            return self.measure(row, eager, est)
        if row.backend in ("compile", "aoti") and self.precision not in a.compile_precisions:
            row.precision = self.torch_precision()
            return self.skip(row, "precision not in --compile-precisions")
        if row.backend == "compile":
            row.precision = self.torch_precision()
            if self.name not in a.compile_models or b not in a.compile_batches:
                return self.skip(row, "not in --compile-models/--compile-batches (cold compile ~1 min per shape on CPU)")
            return self.compiled(row, gen, targs)
        if row.backend == "aoti":
            row.precision = "bf16-weights" if self.precision == "bf16w" else "fp32"
            if self.name not in a.compile_models or b not in a.compile_batches:
                return self.skip(row, "not in --compile-models/--compile-batches (compile ~1 min per graph on CPU)")
            return self.aoti(row, steps, targs)
        if row.backend.startswith("ort") or row.backend == "tensorrt":
            if self.precision == "bf16w":
                return self.skip(row, "ONNX/TensorRT graphs are fp32 or fp16, not bf16 weights")
        if row.backend.startswith("ort"):
            return self.ort(row, steps, inp)
        if row.backend == "tensorrt":
            return self.tensorrt(row, steps, inp)
        raise ValueError(f"unknown backend {row.backend!r}; choose from {BACKENDS}")

    def compiled(self, row: Row, gen: torch.nn.Module, targs: list[torch.Tensor]) -> Row:
        mode = self.args.compile_mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        key = ("compiled", row.method)
        if not hasattr(self, "_compiled"):
            self._compiled: dict = {}
        if key not in self._compiled:
            self._compiled[key] = torch.compile(gen, mode=mode, dynamic=True if self.args.compile_dynamic else False)
        fn = self._compiled[key]

        def run():
            with torch.no_grad(), self.autocast():
                return fn(*targs).cpu()

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
            run()  # reduce-overhead records the CUDA graph on the second call
        row.extra["compile_s"] = round(time.perf_counter() - t0, 1)
        row.note = f"mode={mode}" + (", dynamic batch" if self.args.compile_dynamic else "")
        return self.measure(row, run, None)

    def aoti(self, row: Row, steps: int, targs: list[torch.Tensor]) -> Row:
        from quickstep.export.aoti import compile_aoti, load_aoti
        from quickstep.export.onnx import consistency_graph

        if not hasattr(self, "_aoti"):
            self._aoti: dict = {}
        if steps not in self._aoti:
            path = self.tmp / f"{self.name}_{steps}step.pt2"
            timing = compile_aoti(consistency_graph(self.model, steps), path, num_classes=self.cfg.num_classes,
                                  device=self.device.type, max_batch=max(self.args.compile_batches + [2]))
            self._aoti[steps] = (load_aoti(path), timing)
        runner, timing = self._aoti[steps]
        row.extra.update(timing)
        ftargs = [t.float() if t.is_floating_point() else t for t in targs]

        def run():
            with torch.no_grad():
                out = runner(*ftargs)
            return (out[0] if isinstance(out, (list, tuple)) else out).cpu()

        return self.measure(row, run, None)

    def ort(self, row: Row, steps: int, inp: Inputs) -> Row:
        import onnxruntime as ort
        from quickstep.export.onnx import ort_session

        want = {"ort": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                "ort-trt": "TensorrtExecutionProvider"}[row.backend]
        if want not in ort.get_available_providers():
            return self.skip(row, f"{want} not available in this onnxruntime")
        if want != "CPUExecutionProvider" and self.device.type != "cuda":
            return self.skip(row, "no CUDA device")
        row.precision = "fp32" if want == "CPUExecutionProvider" or not self.bf16 else "fp16"
        if not hasattr(self, "_ort"):
            self._ort: dict = {}
        key = (steps, row.backend)
        if key not in self._ort:
            path = self.onnx_path(steps, row.precision)
            providers: list = [want] if want == "CPUExecutionProvider" else (
                [(want, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                         "trt_engine_cache_path": str(self.tmp / "ort_trt_cache")}), "CUDAExecutionProvider"]
                if want == "TensorrtExecutionProvider" else [want])
            sess = ort_session(path, providers=providers, threads=self.args.threads if self.device.type == "cpu"
                               else None)
            got = sess.get_providers()
            if want not in got:  # a CUDA/TRT request silently falls back to CPU: report it, never time it
                self._ort[key] = None
                self._ort[(key, "why")] = f"session fell back to {got}"
            else:
                self._ort[key] = sess
        sess = self._ort[key]
        if sess is None:
            return self.skip(row, self._ort[(key, "why")])
        feeds = inp.numpy_feeds(steps)
        per = self.predicted_nfe(row.batch)
        est = None if per is None or row.backend != "ort" else per * steps * 0.7  # ORT CPU ~ 0.7x eager
        return self.measure(row, lambda: sess.run(None, feeds), est)

    def tensorrt(self, row: Row, steps: int, inp: Inputs) -> Row:
        from quickstep.export.onnx import consistency_graph
        from quickstep.export.tensorrt import (
            TensorRTRunner,
            TensorRTUnavailable,
            build_engine,
            import_tensorrt,
        )

        try:
            trt = import_tensorrt()
        except TensorRTUnavailable as e:
            return self.skip(row, str(e).split(";")[0])
        row.precision = "fp16" if self.bf16 else "fp32"
        spec = consistency_graph(self.model, steps)
        t0 = time.perf_counter()
        plan = build_engine(trt, self.onnx_path(steps, row.precision), spec, [row.batch],
                            self.tmp / "trt.timing")
        row.extra["build_s"] = round(time.perf_counter() - t0, 1)
        runner = TensorRTRunner(trt, plan, [row.batch])
        feeds = inp.numpy_feeds(steps)
        return self.measure(row, lambda: runner(feeds), None)


# ----------------------------------------------------------------------------------------------- report
def finish(rows: list[Row], benches: dict[str, Bench], peak: float) -> None:
    """Fill vs_teacher (images/s over heun35 eager at the same model and batch) and the roofline fraction."""
    base: dict[tuple[str, int], float] = {}
    for r in rows:  # the teacher baseline: Heun35 eager at the same model and batch (its first precision)
        if r.method == "heun35" and r.backend == "eager-heun" and r.images_per_s:
            base.setdefault((r.model, r.batch), r.images_per_s)
    for r in rows:
        if r.images_per_s is None:
            continue
        if base.get((r.model, r.batch)):
            r.vs_teacher = r.images_per_s / base[(r.model, r.batch)]
        achieved = benches[r.model].flops * nfe(r.method) * r.images_per_s
        r.roofline_frac = achieved / peak


def format_row(r: Row, bench: Bench | None = None) -> str:
    lat = f"{r.latency_ms:10.2f}" if r.latency_ms is not None else f"{'-':>10}"
    ips = f"{r.images_per_s:10.1f}" if r.images_per_s is not None else f"{'-':>10}"
    vs = f"{r.vs_teacher:8.1f}x" if r.vs_teacher is not None else f"{'':>9}"
    rf = f"{100 * r.roofline_frac:7.1f}%" if r.roofline_frac is not None else f"{'':>8}"
    extra = (" " + json.dumps(r.extra)) if r.extra else ""
    return (f"| {r.model:6} | {r.method:6} | {r.backend:10} | {r.precision or '-':18} | {r.batch:5} | {lat} | {ips} "
            f"| {vs} | {rf} | {r.note}{extra} |")


HEADER = ("| model  | method | backend    | precision          | batch | latency ms |   images/s | vs Heun35 | roofline "
          "| note |\n|---|---|---|---|---:|---:|---:|---:|---:|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,cifar", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {BACKENDS}")
    ap.add_argument("--steps", default="1,2", help="sCM step counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None,
                    help=f"comma list of {PRECISIONS} (default: bf16 on CUDA, fp32 on CPU); bf16 = autocast for "
                         "torch paths and fp16 graphs for ORT-CUDA/TensorRT; bf16w = bfloat16 weights")
    ap.add_argument("--compile-precisions", default=None, help="precisions for compile/AOTI cells (default: all)")
    ap.add_argument("--channels-last", action="store_true", help="torch paths with channels_last activations")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (CUDA default reduce-overhead)")
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="compile one graph with a dynamic batch dim instead of one per batch")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch and onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="cpu = process CPU time (needs --threads 1; robust when other jobs share the cores); "
                         "auto = cpu on a CPU device with 1 thread, wall otherwise")
    ap.add_argument("--max-call-s", type=float, default=20.0, help="extrapolate cells whose one call is slower")
    ap.add_argument("--cell-budget-s", type=float, default=30.0, help="time once if repeats would exceed this")
    ap.add_argument("--compile-models", default="digits", help="models for torch.compile / AOTInductor")
    ap.add_argument("--compile-batches", default="1,8,64", help="batches for torch.compile / AOTInductor")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--peak-sizes", default="", help="matmul sizes for the measured peak (comma list)")
    a = ap.parse_args()
    a.peak_sizes = tuple(int(x) for x in a.peak_sizes.split(",") if x)
    a.batches = [int(x) for x in a.batches.split(",")]
    a.steps = [int(x) for x in a.steps.split(",")]
    a.backends = [x for x in a.backends.split(",") if x]
    a.compile_models = a.compile_models.split(",")
    a.compile_batches = [int(x) for x in a.compile_batches.split(",") if x]
    a.precision = (a.precision or ("bf16" if a.device.startswith("cuda") else "fp32")).split(",")
    a.compile_precisions = a.compile_precisions.split(",") if a.compile_precisions else a.precision
    bad_p = [p for p in a.precision + a.compile_precisions if p not in PRECISIONS]
    if bad_p:
        raise SystemExit(f"unknown precisions {bad_p}; choose from {list(PRECISIONS)}")
    bad = [x for x in a.backends if x not in BACKENDS] + [m for m in a.models.split(",") if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown backends/models {bad}; backends: {list(BACKENDS)}, models: {sorted(MODELS)}")
    device = torch.device(a.device)
    global CLOCK
    if a.clock == "cpu" or (a.clock == "auto" and device.type == "cpu" and a.threads == 1):
        if device.type != "cpu":
            raise SystemExit("--clock cpu measures CPU work and is meaningless for a CUDA device")
        CLOCK = time.process_time
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the "% of bf16 matmul rate"
    if a.compile_dynamic or a.compile_batches:  # one graph per (step count, batch): keep them all compiled
        from quickstep.serve.backends.torch import raise_recompile_limit

        raise_recompile_limit(torch, 64)
    sizes = a.peak_sizes or ((4096, 8192) if device.type == "cuda" else (512, 1024, 2048))  # best of a few sizes
    peak = peak_torch = max(matmul_rate(device, peak_dtype, n=n) for n in sizes)
    peak_note = f"torch.mm {peak_torch / 1e12:.3f}"
    if device.type == "cpu":
        try:
            peak_ort = max(ort_matmul_rate(n=n, threads=a.threads) for n in sizes)
            peak = max(peak, peak_ort)
            peak_note += f", onnxruntime MatMul {peak_ort / 1e12:.3f}"
        except ImportError:
            pass
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()} cores"
    print(f"# bench_generation {time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__} | {hw} | "
          f"threads {torch.get_num_threads()} | clock {'process CPU time' if CLOCK is time.process_time else 'wall'} | "
          f"load average {os.getloadavg()[0]:.1f} | "
          f"measured {str(peak_dtype).split('.')[-1]} matmul peak {peak / 1e12:.3f} TFLOP/s ({peak_note})")
    benches: dict[str, Bench] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            for precision in a.precision:
                b = Bench(name, MODELS[name], a, device, Path(tmp), precision)
                benches[name] = b
                roof = b.flops / peak
                print(f"\n## {name} {b.torch_precision()}: {b.params / 1e6:.2f}M params, {b.flops / 1e9:.3f} GFLOP "
                      f"per image per NFE; roofline {1e3 * roof:.3f} ms per image per NFE ({1 / roof:.0f} images/s "
                      "at 1 NFE)")
                print(HEADER, flush=True)
                done = list(rows)
                rows += b.run_all(lambda b=b, done=done: write_json(a.json, done + b.rows, benches, peak, peak_dtype,
                                                                  hw))
                del b.model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finish(rows, benches, peak)
    print(f"\n## summary (ratios filled in; load average now {os.getloadavg()[0]:.1f})\n{HEADER}")
    for r in rows:
        print(format_row(r))
    write_json(a.json, rows, benches, peak, peak_dtype, hw)


def write_json(path: Path | None, rows: list[Row], benches: dict[str, Bench], peak: float, peak_dtype: torch.dtype,
               hw: str) -> None:
    """The rows so far as JSON (also after every cell: a run killed by a time limit keeps what it measured)."""
    if path is None:
        return
    finish(rows, benches, peak)
    path.write_text(json.dumps({"peak_flops": peak, "peak_dtype": str(peak_dtype), "device": hw,
                                "threads": torch.get_num_threads(),
                                "models": {k: {"params": v.params, "flops_per_image": v.flops}
                                           for k, v in benches.items()},
                                "rows": [asdict(r) for r in rows]}, indent=1))

if __name__ == "__main__":
    main()

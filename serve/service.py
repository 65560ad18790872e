"""The generation service: models, seeds -> noise, micro-batched backend runs, image encoding.

Routes and the Gradio UI both call `GenerationService.generate`; nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, create_backend
from .batcher import Disconnected, Job, MicroBatcher
from .bundle import Bundle, check_quality_gate, same_device
from .errors import InvalidRequest, ModelNotFound, NotReady
from .metrics import ServeMetrics
from .schemas import MAX_SEED, GenerateRequest, ModelInfo
from .settings import ServeSettings

log = logging.getLogger("quickstep.serve")

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


# ----------------------------------------------------------------------------------------------- seeds and images
def draw_noise(seed: int, n: int, shape: tuple[int, int, int], num_noise: int) -> list[np.ndarray]:
    """Image k uses default_rng([seed, k]).standard_normal((C,H,W), float32), then the 2nd draw for noise2, ...
    -> num_noise arrays [n, C, H, W] (DESIGN.md: same pixels whatever the image is batched with)."""
    out = [np.empty((n, *shape), np.float32) for _ in range(num_noise)]
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        for j in range(num_noise):
            out[j][k] = rng.standard_normal(shape, dtype=np.float32)
    return out


def draw_labels(seed: int, n: int, num_classes: int, num_noise: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Class labels when a conditional model gets none: image k's label is the next draw of default_rng([seed, k])
    after its noise, integers(0, num_classes)."""
    labels = np.empty((n,), np.int64)
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        for _ in range(num_noise):
            rng.standard_normal(shape, dtype=np.float32)
        labels[k] = rng.integers(0, num_classes)
    return labels


def upscale_nearest(images: np.ndarray, scale: int) -> np.ndarray:
    """[B, H, W, C] -> [B, H*scale, W*scale, C] by pixel repetition."""
    if scale == 1:
        return images
    return images.repeat(scale, axis=1).repeat(scale, axis=2)


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """One uint8 [H, W, C] image -> PNG / JPEG / WebP bytes (lossless WebP, quality-95 JPEG)."""
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    img = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_images(images: np.ndarray, fmt: str, scale: int) -> list[bytes]:
    """Upscale then encode every image of a [B, H, W, C] batch."""
    up = upscale_nearest(images, scale)
    return [encode_image(im, fmt) for im in up]


# ----------------------------------------------------------------------------------------------- models
@dataclass
class ModelRuntime:
    """A loaded model: its bundle, backend and batcher; `ready` once loaded and warmed."""

    bundle: Bundle
    backend: Backend
    batcher: MicroBatcher | None = None
    ready: bool = False
    error: str | None = None
    gated_on: str | None = None  # the device description the quality gate was checked against

    @property
    def name(self) -> str:
        return self.bundle.name


@dataclass
class GenerationResult:
    """What generate() returns: the images (uint8 NHWC, before scaling), their encodings and the seed used."""

    model: str
    steps: int
    seed: int
    images: np.ndarray
    encoded: list[bytes]
    mime: str
    class_labels: list[int] | None
    latency_ms: float
    extra: dict = field(default_factory=dict)


class GenerationService:
    """All models of one server; loads/warms them, validates requests, draws noise, batches, encodes."""

    def __init__(self, bundles: list[Bundle], settings: ServeSettings, metrics: ServeMetrics):
        if not bundles:
            raise ValueError("the service needs at least one bundle")
        names = [b.name for b in bundles]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two bundles share the name(s) {dup}; model names must be unique")
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelRuntime] = {b.name: ModelRuntime(b, create_backend(b, settings)) for b in bundles}
        self.default_model = settings.default_model or names[0]
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not among the loaded models {names}")
        for rt in self.models.values():
            rt.backend.preflight()
            rt.gated_on = rt.backend.planned_describe()
            self._quality_gate(rt, rt.gated_on)
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self.loaded = asyncio.Event()

    def _quality_gate(self, rt: ModelRuntime, device: str) -> None:
        """QualityGateError when the bundle's quality report flags this backend on `device` (unless --force)."""
        warning = check_quality_gate(rt.bundle, self.settings.backend, self.settings.force, device=device)
        if warning:
            log.warning(warning)

    # ---------------------------------------------------------------- lifecycle
    def executor(self, device: str) -> ThreadPoolExecutor:
        """One worker thread per device: every model on that device runs its batches there."""
        if device not in self._executors:
            self._executors[device] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"quickstep-{device}")
        return self._executors[device]

    @property
    def ready(self) -> bool:
        return all(rt.ready for rt in self.models.values())

    async def load_all(self) -> None:
        """Load and warm every model on its device's worker thread; readiness flips when all are warm."""
        loop = asyncio.get_running_loop()
        for rt in self.models.values():
            self.metrics.ready.labels(rt.name).set(0)
            try:
                await loop.run_in_executor(self.executor("loader"), rt.backend.load)
                actual = rt.backend.describe()
                if rt.gated_on is not None and not same_device(actual, rt.gated_on):  # e.g. a CUDA fallback
                    log.info("model %s runs on %s, not %s as planned: quality gate again", rt.name, actual,
                             rt.gated_on)
                    rt.gated_on = actual
                    self._quality_gate(rt, actual)
                ex = self.executor(rt.backend.device)
                await loop.run_in_executor(ex, rt.backend.warmup)
            except Exception as e:  # noqa: BLE001 - reported through /health/ready and the log
                rt.error = f"{type(e).__name__}: {e}"
                log.error("model %s failed to load: %s", rt.name, rt.error)
                continue
            s = self.settings
            rt.batcher = MicroBatcher(rt.name, rt.backend.run, ex, self.metrics, max_batch=s.max_batch,
                                      max_wait_s=s.max_wait_ms / 1000.0, max_queue=s.max_queue)
            rt.batcher.start()
            rt.batcher.record_metrics = False
            try:
                await self._warm_request_path(rt)
            except Exception as e:  # noqa: BLE001 - reported through /health/ready and the log
                rt.error = f"{type(e).__name__}: {e}"
                log.error("model %s failed its warm-up request: %s", rt.name, rt.error)
                continue
            finally:
                rt.batcher.record_metrics = True
            rt.ready = True
            self.metrics.ready.labels(rt.name).set(1)
            log.info("model %s ready on %s", rt.name, rt.backend.describe())
        self.loaded.set()

    async def _warm_request_path(self, rt: ModelRuntime) -> None:
        """Warm what the backend warm-up does not reach: the batcher, the encoders of every format and the encoding
        threads, with requests of the largest n for each step count and format (concurrent up to the queue size).
        Without it the first requests after readiness pay for lazy imports, thread and allocator-arena creation
        (measured: +19.4 MB RSS over the first 16 requests in the load/soak test)."""
        b = rt.bundle
        s = self.settings
        n = max(1, min(self.max_n(), s.max_batch))
        reqs = [GenerateRequest(model=b.name, n=n, steps=steps, seed=k, format=fmt, scale=2)
                for k, (steps, fmt) in enumerate((st, f) for st in b.steps_supported for f in MIME)]
        width = max(1, min(s.max_queue, len(reqs)))  # never more at once than the queue admits
        for i in range(0, len(reqs), width):
            await asyncio.gather(*(self.generate(r, warmup=True) for r in reqs[i:i + width]))

    async def close(self) -> None:
        """Finish in-flight and queued work (graceful shutdown), then release backends and threads."""
        await asyncio.gather(*(rt.batcher.close(self.settings.shutdown_timeout_s)
                               for rt in self.models.values() if rt.batcher is not None))
        for rt in self.models.values():
            rt.ready = False
            rt.backend.close()
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- queries
    def resolve(self, name: str | None) -> ModelRuntime:
        """The named model (default when None) or ModelNotFound naming the available ones."""
        key = name or self.default_model
        rt = self.models.get(key)
        if rt is None:
            raise ModelNotFound(f"unknown model {key!r}; available models: {sorted(self.models)}")
        return rt

    def info(self, rt: ModelRuntime) -> ModelInfo:
        b = rt.bundle
        return ModelInfo(name=b.name, kind=b.kind, backend=rt.backend.describe(), image_shape=list(b.image_shape),
                         num_classes=b.num_classes, class_names=b.class_names,
                         steps_supported=list(b.steps_supported),
                         default_steps=b.default_steps, max_batch=self.settings.max_batch, ready=rt.ready,
                         quality=b.quality)

    def max_n(self) -> int:
        return self.settings.max_images_per_request

    # ---------------------------------------------------------------- generation
    def validate(self, req: GenerateRequest) -> tuple[ModelRuntime, int]:
        """Model exists (404), n, steps and class_label fit it (422 naming the allowed values)."""
        rt = self.resolve(req.model)
        b = rt.bundle
        if req.n > self.max_n():
            raise InvalidRequest(f"n: must be between 1 and {self.max_n()} (this server's per-request limit), "
                                 f"got {req.n}")
        steps = req.steps if req.steps is not None else b.default_steps
        if steps not in b.steps_supported:
            raise InvalidRequest(f"steps: model {b.name!r} supports steps {list(b.steps_supported)}, got {steps}")
        if req.class_label is not None:
            if b.num_classes == 0:
                raise InvalidRequest(f"class_label: model {b.name!r} is unconditional; omit class_label")
            if not 0 <= req.class_label < b.num_classes:
                raise InvalidRequest(f"class_label: must be between 0 and {b.num_classes - 1} for model {b.name!r}, "
                                     f"got {req.class_label}")
        return rt, steps

    async def generate(self, req: GenerateRequest, *, timeout_s: float | None = None,
                       disconnected: Disconnected | None = None, warmup: bool = False) -> GenerationResult:
        """Validate, draw the seeded noise, run through the model's batcher, encode off the event loop."""
        t0 = time.perf_counter()
        rt, steps = self.validate(req)
        if (not rt.ready and not warmup) or rt.batcher is None:
            why = f" (load failed: {rt.error})" if rt.error else " (still loading and warming up)"
            raise NotReady(f"model {rt.name!r} is not ready{why}", headers={"Retry-After": "1"})
        b = rt.bundle
        g = b.graphs[steps]
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        nn = len(g.noise_inputs)
        noises = draw_noise(seed, req.n, b.image_shape, nn)
        labels: np.ndarray | None = None
        if g.has_labels:
            labels = (np.full((req.n,), req.class_label, np.int64) if req.class_label is not None
                      else draw_labels(seed, req.n, b.num_classes, nn, b.image_shape))
        loop = asyncio.get_running_loop()
        timeout = min(timeout_s, self.settings.timeout_s) if timeout_s is not None else self.settings.timeout_s
        job = Job(steps=steps, noises=noises, labels=labels, deadline=loop.time() + timeout, disconnected=disconnected)
        images = await rt.batcher.submit(job)
        encoded = await asyncio.to_thread(encode_images, images, req.format, req.scale)
        return GenerationResult(
            model=b.name, steps=steps, seed=seed, images=images, encoded=encoded, mime=MIME[req.format],
            class_labels=None if labels is None else [int(x) for x in labels],
            latency_ms=(time.perf_counter() - t0) * 1000.0)

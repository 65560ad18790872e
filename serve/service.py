"""The generation service: models, seeds -> noise, micro-batched backend runs, image encoding.

Routes and the Gradio UI both call `GenerationService.generate`; nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from quickstep.artifacts import draw_labels, draw_noise

from .backends.base import Backend, create_backend
from .batcher import Disconnected, Job, MicroBatcher
from .bundle import Bundle, check_quality_gate
from .device import Device
from .errors import InvalidRequest, ModelNotFound, NotReady
from .metrics import ServeMetrics
from .schemas import MAX_SEED, DeviceInfo, GenerateRequest, ModelInfo
from .settings import ServeSettings

log = logging.getLogger("quickstep.serve")

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


# ----------------------------------------------------------------------------------------------- images
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


def draw_items(seeds: np.ndarray, labels: np.ndarray | None, num_classes: int, shape: tuple[int, int, int],
               num_noise: int, conditional: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
    """One image per seed, each exactly image 0 of a request with that seed (noise default_rng([seed, 0]); label
    given, or its draw after the noise): the v2 route's batch of seeds."""
    per = [draw_noise(int(s), 1, shape, num_noise) for s in seeds]
    noises = [np.concatenate([p[j] for p in per]) for j in range(num_noise)]
    if not conditional:
        return noises, None
    if labels is None:
        labels = np.concatenate([draw_labels(int(s), 1, num_classes, num_noise, shape) for s in seeds])
    return noises, np.asarray(labels, np.int64)


MAX_SCALE = 16


def image_sizes(bundle: Bundle) -> list[str]:
    """'WxH' of the native resolution and of each integer upscale up to MAX_SCALE."""
    _, h, w = bundle.image_shape
    return [f"{w * k}x{h * k}" for k in range(1, MAX_SCALE + 1)]


def scale_for_size(bundle: Bundle, size: str | None) -> int:
    """The integer upscale that gives `size` ('WxH'; None or 'auto' = native); InvalidRequest naming the sizes."""
    if size is None or size.strip().lower() == "auto":
        return 1
    sizes = image_sizes(bundle)
    norm = size.strip().lower().replace(" ", "")
    if norm in sizes:
        return sizes.index(norm) + 1
    raise InvalidRequest(f"size: {size[:40]!r} is not served by model {bundle.name!r}; allowed: its native "
                         f"{sizes[0]} or an integer upscale of it: {', '.join(sizes)}", param="size")


def class_names(bundle: Bundle) -> list[str]:
    """The manifest's class names, else the class indices as names ('0', '1', ...)."""
    return list(bundle.class_names) if bundle.class_names else [str(i) for i in range(bundle.num_classes)]


def class_for_prompt(bundle: Bundle, prompt: str) -> int | None:
    """The class a prompt names (a class name or alias as a whole word, case-insensitive); None for an empty prompt
    or an unconditional model; InvalidRequest when it names none or several."""
    if bundle.num_classes == 0 or not prompt.strip():
        return None
    text = prompt.lower()
    words = {name: i for i, name in enumerate(class_names(bundle))} | bundle.class_aliases
    found = {i for word, i in words.items()
             if re.search(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", text)}
    allowed = ", ".join(class_names(bundle)) + (f" (or {', '.join(bundle.class_aliases)})" if bundle.class_aliases
                                                 else "")
    if len(found) == 1:
        return found.pop()
    if not found:
        raise InvalidRequest(f"prompt: {prompt[:60]!r} names no class of model {bundle.name!r}; name one of: "
                             f"{allowed}; or send an empty prompt for a random class", param="prompt")
    names = class_names(bundle)
    raise InvalidRequest(f"prompt: {prompt[:60]!r} names several classes ({', '.join(names[i] for i in sorted(found))})"
                         f"; name one of: {allowed}", param="prompt")


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` at the OS level too (Linux: /proc/<pid>/task/<tid>/comm, `top -H`), so that
    the backend worker's CPU time can be told apart from the HTTP side's (bench_serve.py)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


# ----------------------------------------------------------------------------------------------- models
@dataclass
class ModelRuntime:
    """A loaded model: its bundle, backend and batcher; `ready` once loaded and warmed."""

    bundle: Bundle
    backend: Backend
    batcher: MicroBatcher | None = None
    ready: bool = False
    error: str | None = None
    gated_on: Device | None = None  # the device the quality gate was checked against

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
            rt.gated_on = rt.backend.planned_device()
            self._quality_gate(rt, rt.gated_on)
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self.loaded = asyncio.Event()

    def _quality_gate(self, rt: ModelRuntime, device: Device) -> None:
        """QualityGateError when the bundle's quality report flags this backend on `device` (unless --force)."""
        warning = check_quality_gate(rt.bundle, self.settings.backend, self.settings.force, device=device)
        if warning:
            log.warning(warning)

    # ---------------------------------------------------------------- lifecycle
    def executor(self, device: str) -> ThreadPoolExecutor:
        """One worker thread per device: every model on that device runs its batches there."""
        if device not in self._executors:
            self._executors[device] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"quickstep-{device}",
                                                         initializer=name_os_thread, initargs=(f"quickstep-{device}",))
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
                actual = rt.backend.device_info()
                if rt.gated_on is not None and actual != rt.gated_on:  # e.g. a CUDA fallback
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
        dev = rt.backend.device_info()
        return ModelInfo(id=b.name, created=created_time(b), name=b.name, kind=b.kind, backend=str(dev),
                         device=DeviceInfo(backend=dev.backend, kind=dev.kind, provider=dev.provider),
                         image_shape=list(b.image_shape), num_classes=b.num_classes,
                         steps_supported=list(b.steps_supported), default_steps=b.default_steps,
                         max_batch=self.settings.max_batch, ready=rt.ready,
                         class_names=class_names(b) if b.num_classes else None, class_aliases=dict(b.class_aliases),
                         sizes=image_sizes(b), quality=None if b.quality is None else b.quality.to_json())

    def max_n(self) -> int:
        return self.settings.max_images_per_request

    # ---------------------------------------------------------------- generation
    def validate(self, req: GenerateRequest) -> tuple[ModelRuntime, int]:
        """Model exists (404), n, steps and class_label fit it (422 naming the allowed values)."""
        return self.check(req.model, req.n, req.steps, [] if req.class_label is None else [req.class_label])

    def check(self, model: str | None, n: int, steps: int | None, labels: list[int],
              n_field: str = "n", label_field: str = "class_label") -> tuple[ModelRuntime, int]:
        """The model (ModelNotFound) and its step count; n images and the given class labels must fit them."""
        rt = self.resolve(model)
        b = rt.bundle
        if not 1 <= n <= self.max_n():
            raise InvalidRequest(f"{n_field}: must be between 1 and {self.max_n()} (this server's per-request "
                                 f"limit), got {n}", param=n_field)
        steps = steps if steps is not None else b.default_steps
        if steps not in b.steps_supported:
            raise InvalidRequest(f"steps: model {b.name!r} supports steps {list(b.steps_supported)}, got {steps}",
                                 param="steps")
        if labels:
            if b.num_classes == 0:
                raise InvalidRequest(f"{label_field}: model {b.name!r} is unconditional; omit {label_field}",
                                     param=label_field)
            bad = [x for x in labels if not 0 <= x < b.num_classes]
            if bad:
                raise InvalidRequest(f"{label_field}: must be between 0 and {b.num_classes - 1} for model "
                                     f"{b.name!r}, got {bad[0]}", param=label_field)
        return rt, steps

    def _runnable(self, rt: ModelRuntime, warmup: bool = False) -> MicroBatcher:
        if (not rt.ready and not warmup) or rt.batcher is None:
            why = f" (load failed: {rt.error})" if rt.error else " (still loading and warming up)"
            raise NotReady(f"model {rt.name!r} is not ready{why}", headers={"Retry-After": "1"})
        return rt.batcher

    async def _run(self, batcher: MicroBatcher, steps: int, noises: list[np.ndarray], labels: np.ndarray | None,
                   timeout_s: float | None, disconnected: Disconnected | None) -> np.ndarray:
        """Through the model's micro-batcher under min(timeout_s, the server's timeout)."""
        loop = asyncio.get_running_loop()
        timeout = min(timeout_s, self.settings.timeout_s) if timeout_s is not None else self.settings.timeout_s
        job = Job(steps=steps, noises=noises, labels=labels, deadline=loop.time() + timeout, disconnected=disconnected)
        return await batcher.submit(job)

    async def generate(self, req: GenerateRequest, *, timeout_s: float | None = None,
                       disconnected: Disconnected | None = None, warmup: bool = False) -> GenerationResult:
        """Validate, draw the seeded noise, run through the model's batcher, encode off the event loop."""
        t0 = time.perf_counter()
        rt, steps = self.validate(req)
        batcher = self._runnable(rt, warmup)
        b = rt.bundle
        g = b.graphs[steps]
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        nn = len(g.noise_inputs)
        noises = draw_noise(seed, req.n, b.image_shape, nn)
        labels: np.ndarray | None = None
        if g.has_labels:
            labels = (np.full((req.n,), req.class_label, np.int64) if req.class_label is not None
                      else draw_labels(seed, req.n, b.num_classes, nn, b.image_shape))
        images = await self._run(batcher, steps, noises, labels, timeout_s, disconnected)
        encoded = await asyncio.to_thread(encode_images, images, req.format, req.scale)
        return GenerationResult(
            model=b.name, steps=steps, seed=seed, images=images, encoded=encoded, mime=MIME[req.format],
            class_labels=None if labels is None else [int(x) for x in labels],
            latency_ms=(time.perf_counter() - t0) * 1000.0)

    async def generate_seeds(self, model: str | None, seeds: np.ndarray, labels: np.ndarray | None,
                             steps: int | None, *, timeout_s: float | None = None,
                             disconnected: Disconnected | None = None) -> GenerationResult:
        """One image per seed (image i = image 0 of a request with seeds[i] and labels[i]), raw uint8 [B, H, W, C],
        not encoded: the v2 route."""
        t0 = time.perf_counter()
        rt, steps = self.check(model, len(seeds), steps, [] if labels is None else [int(x) for x in labels],
                               n_field="seed", label_field="class_label")
        batcher = self._runnable(rt)
        b = rt.bundle
        g = b.graphs[steps]
        noises, used = draw_items(seeds, labels, b.num_classes, b.image_shape, len(g.noise_inputs), g.has_labels)
        images = await self._run(batcher, steps, noises, used, timeout_s, disconnected)
        return GenerationResult(
            model=b.name, steps=steps, seed=int(seeds[0]), images=images, encoded=[], mime="",
            class_labels=None if used is None else [int(x) for x in used],
            latency_ms=(time.perf_counter() - t0) * 1000.0)

    async def generate_noise(self, model: str, steps: int, noises: list[np.ndarray], labels: np.ndarray | None, *,
                             timeout_s: float | None = None, disconnected: Disconnected | None = None
                             ) -> GenerationResult:
        """Caller-drawn noise (and labels) through the batcher: the v2 route's Triton-layout models, whose inputs
        are the graph's own.  Raw uint8 [B, H, W, C], not encoded."""
        t0 = time.perf_counter()
        rt, steps = self.check(model, int(noises[0].shape[0]), steps, [] if labels is None else
                               [int(x) for x in labels], n_field="noise", label_field="class_labels")
        images = await self._run(self._runnable(rt), steps, [np.ascontiguousarray(x, np.float32) for x in noises],
                                 None if labels is None else np.asarray(labels, np.int64), timeout_s, disconnected)
        return GenerationResult(model=rt.name, steps=steps, seed=-1, images=images, encoded=[], mime="",
                                class_labels=None if labels is None else [int(x) for x in labels],
                                latency_ms=(time.perf_counter() - t0) * 1000.0)


def created_time(bundle: Bundle) -> int:
    """The manifest's `created` (ISO 8601, UTC) as Unix time; 0 when absent or unreadable."""
    import datetime as dt

    text = bundle.manifest.created
    try:
        return int(dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()) if text else 0
    except ValueError:
        return 0

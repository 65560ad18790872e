"""Prometheus metrics on a per-app CollectorRegistry (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Request counts by route and status; queue/compute/end-to-end latency; batch sizes; queue depth; runs."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("quickstep_requests", "HTTP requests by API (quickstep, openai, v2), route and status",
                                ["api", "route", "method", "status"], registry=r)
        self.in_progress = Gauge("quickstep_requests_in_progress", "HTTP requests received and not yet answered",
                                 registry=r)
        self.request_latency = Histogram("quickstep_request_latency_seconds", "End-to-end HTTP latency by API and route",
                                         ["api", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("quickstep_queue_latency_seconds", "Time a request waited for its batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_latency = Histogram("quickstep_compute_latency_seconds", "Backend time of one batch",
                                         ["model", "steps"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("quickstep_batch_size_images", "Images per backend run", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("quickstep_queue_depth", "Requests waiting per model", ["model"], registry=r)
        self.backend_runs = Counter("quickstep_backend_runs", "Backend runs (batches) by model and steps",
                                    ["model", "steps"], registry=r)
        self.backend_failures = Counter("quickstep_backend_failures", "Backend runs that raised", ["model"], registry=r)
        self.images = Counter("quickstep_images_generated", "Images generated", ["model"], registry=r)
        self.dropped = Counter("quickstep_requests_dropped", "Requests dropped before running", ["model", "reason"],
                               registry=r)
        self.ready = Gauge("quickstep_model_ready", "1 once the model is loaded and warmed", ["model"], registry=r)

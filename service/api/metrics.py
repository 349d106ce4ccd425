"""Prometheus metrics of one service process (one worker per process: no multiprocess mode needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from crfiqa.service.pipeline import Prepared
    from crfiqa.service.results import ImageResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FACES_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
SCORE_BUCKETS = tuple(range(10, 101, 10))


class Metrics:
    """All metric families, in a registry of their own so each app instance starts from zero."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("crfiqa_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("crfiqa_request_duration_seconds", "Request latency in seconds",
                                          ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("crfiqa_stage_duration_seconds",
                                        "Time per image spent in each stage (decode, detect, align, quality)",
                                        ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("crfiqa_inference_batch_size", "Faces per quality inference call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("crfiqa_queue_depth", "Faces waiting for quality inference", registry=r)
        self.faces_per_image = Histogram("crfiqa_faces_per_image", "Faces detected per image",
                                         buckets=FACES_BUCKETS, registry=r)
        self.quality_score = Histogram("crfiqa_quality_score", "Quality scores (0-100) served, for drift monitoring",
                                       buckets=SCORE_BUCKETS, registry=r)
        self.errors = Counter("crfiqa_errors_total", "Errors by code (per image or per request)", ["code"],
                              registry=r)
        self.model_info = Gauge("crfiqa_model_info", "Models in use (value 1)",
                                ["name", "version", "provider", "role"], registry=r)
        self.key_requests = Counter("crfiqa_api_key_requests_total",
                                    "Authenticated requests by API key (key_id: a short hash, never the key)",
                                    ["key_id"], registry=r)
        self.in_flight = Gauge("crfiqa_requests_in_flight", "HTTP requests being served", registry=r)
        self.ready = Gauge("crfiqa_ready", "1 once models are loaded and warmed up", registry=r)

    def observe_images(self, prepared: Sequence[Prepared], results: Sequence[ImageResult]) -> None:
        """Per-image stage times, errors, faces and scores of one request."""
        for p, r in zip(prepared, results):
            for stage, seconds in p.timings.items():
                self.stage_duration.labels(stage).observe(seconds)
            if r.error is not None:
                self.errors.labels(r.error.code).inc()
                continue
            self.faces_per_image.observe(len(r.faces))
            for face in r.faces:
                if face.quality is not None:
                    self.quality_score.observe(face.quality.score)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

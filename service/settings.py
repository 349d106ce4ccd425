"""Runtime configuration from the environment (prefix ``CRFIQA_``), shared by ``crfiqa serve`` and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from crfiqa.service.detect import DetectorSettings
from crfiqa.service.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from crfiqa.service.pipeline import PipelineSettings


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, as in a cpuset-limited container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every setting of the service; values out of range are refused at start-up."""

    model_config = SettingsConfigDict(env_prefix="CRFIQA_", extra="ignore")

    models_dir: Path | None = Field(None, description="directory of fetched models (default: the packaged models/)")
    detector: str | None = Field(None, description="detector name from the manifest (default scrfd_500m)")
    quality_model: str | None = Field(None, description="quality model: manifest name or .onnx path")
    providers: str = Field("", description="comma-separated ONNX Runtime providers (empty: the best available)")
    det_size: int | None = Field(None, ge=32, le=4096, description="detector input size, pixels (unset: each "
                                 "image at its own size, up to the detector's 640)")
    det_threshold: float = Field(0.5, ge=0.0, le=1.0, description="default detection score threshold")
    max_body_bytes: int = Field(50 * 1024 * 1024, gt=0, description="largest request body, bytes")
    max_images_per_request: int = Field(64, gt=0, description="most images in one request")
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="largest encoded image, bytes")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="largest decoded image, pixels")
    max_faces_per_image: int = Field(100, gt=0, le=1000, description="most faces kept per image, best first")
    max_batch_size: int = Field(32, gt=0, le=1024, description="most faces in one quality inference")
    # 0: a batch takes what is queued when a slot frees and never waits (on CPU batch 1 costs ~ batch 32 per
    # face, so waiting only adds latency); a GPU gains from 2-5 ms (larger batches).
    max_queue_delay_ms: float = Field(0.0, ge=0.0, le=10_000, description="longest wait to fill a batch, ms "
                                      "(0 = what is already queued, no wait)")
    max_queue_size: int = Field(1024, gt=0, description="most faces waiting for inference before 503")
    worker_threads: int = Field(2, gt=0, le=256, description="threads for decoding, detection and alignment")
    concurrent_batches: int = Field(2, gt=0, le=64, description="quality batches run at once (each in its own "
                                    "inference thread): the next batch starts while the last is answered")
    # Measured on 2 idle cores (docs/benchmarks.md, "Service"): 1 thread per session call and 2 batches at once
    # give 89 % / 98 % of the in-process rate at 4 / 16 clients; all cores per call oversubscribe the
    # concurrent batches and the worker threads (85 % / 84 %), one batch at a time leaves a core idle (75 %).
    inference_threads: int = Field(1, ge=0, le=256, description="ONNX Runtime intra-op threads per session call "
                                   "(0 = all cores: lowest latency for one request alone)")
    # Two threads: 1.4x faster for a lone face on 2 cores; more threads than the cores this process may use
    # (4 on 2: 1 client at 31 % instead of 67 %) spin against each other, so the default never exceeds them.
    solo_threads: int = Field(2 if _usable_cpus() >= 2 else 0, ge=0, le=256,
                              description="ONNX Runtime threads of a model call that starts while no other runs "
                              "and one image is in flight (a lone request's latency; 0 = off; CPU only)")
    batch_detection: bool | None = Field(None, description="detect a request's images in one network call per "
                                         "input shape (unset: on a GPU provider only)")
    warmup_rounds: int = Field(2, ge=1, le=100_000, description="warm-up inferences per batch size before ready")
    api_keys: str = Field("", description="comma-separated API keys; empty (and no keys file) = no authentication")
    api_keys_file: Path | None = Field(None, description="file of API keys, one per line (# comments); re-read "
                                       "on SIGHUP or when it changes; when set, authentication is on")
    metrics_require_key: bool = Field(False, description="require an API key on /metrics too")
    rate_limit_per_s: float = Field(0.0, ge=0, description="requests per second per API key (token bucket; 0 = off)")
    rate_limit_burst: int = Field(10, gt=0, description="token bucket size: requests a key may send at once")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS ('*' = any); empty = CORS off")
    json_process_bytes: int = Field(1 << 20, ge=0, description="JSON bodies this large are parsed in a worker "
                                    "process, off the event loop's GIL (0 = never: parse on the event loop)")
    limit_concurrency: int = Field(256, gt=0, description="most requests in flight; more get 503 + Retry-After")
    header_timeout_s: float = Field(10.0, gt=0, description="a client must send its request headers within this")
    body_timeout_s: float = Field(60.0, gt=0, description="a client must send its whole request body within this")
    body_min_rate: int = Field(16384, ge=0, description="after body_grace_s, the body must have arrived at this "
                               "many bytes/s on average, so slow uploads do not hold in-flight slots (0 = off)")
    body_grace_s: float = Field(5.0, gt=0, description="time a body may take before body_min_rate applies")
    keep_alive_s: int = Field(5, gt=0, description="idle keep-alive connections are closed after this")
    inference_timeout_s: float = Field(30.0, gt=0, description="a batch running longer marks the service not ready")
    inference_stall_exit_s: float = Field(300.0, ge=0, description="a batch stuck this long exits the process "
                                          "(code 70) for a restart; 0 = never")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    log_level: str = Field("info", description="debug, info, warning or error")
    graceful_timeout_s: float = Field(30.0, ge=0, description="how long shutdown waits for in-flight requests")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("log_level must be debug, info, warning, error or critical")
        return v

    @property
    def provider_list(self) -> tuple[str, ...]:
        """Providers as a tuple."""
        return tuple(p.strip() for p in self.providers.split(",") if p.strip())

    @property
    def key_list(self) -> list[str]:
        """The inline API keys (``CRFIQA_API_KEYS``) as a list."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def cors_list(self) -> list[str]:
        """CORS origins as a list (empty: CORS off)."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def pipeline_settings(self) -> PipelineSettings:
        """The pipeline these settings describe."""
        return PipelineSettings(
            detector=self.detector, quality=self.quality_model, providers=self.provider_list,
            detection=DetectorSettings(input_size=self.det_size, score_threshold=self.det_threshold),
            max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, batch_size=self.max_batch_size,
            models_dir=self.models_dir, intra_op_threads=self.inference_threads, solo_threads=self.solo_threads,
            batch_detection=self.batch_detection,
        )

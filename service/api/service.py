"""The Service: a thin adapter over the pipeline's stages for HTTP requests. ``Pipeline.prepare`` runs in a
worker thread pool, the DynamicBatcher batches ``Pipeline.score`` across requests (``concurrent_batches``
at once, each in an inference thread), ``Pipeline.finish`` builds each result; a watchdog turns a stalled
inference into not-ready."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from crfiqa.service.api.batching import DynamicBatcher, QueueFullError
from crfiqa.service.api.errors import RequestError
from crfiqa.service.api.keys import KeyStore, RateLimiter
from crfiqa.service.api.metrics import Metrics
from crfiqa.service.api.parsing import Upload, decode_data
from crfiqa.service.api.schemas import Options
from crfiqa.service.bestshot import DEFAULT_EMBEDDER, create_embedder
from crfiqa.service.errors import CrfiqaError, ModelError
from crfiqa.service.facemodel import RecognitionModel
from crfiqa.service.pipeline import Options as PipelineOptions
from crfiqa.service.pipeline import Pipeline, Prepared
from crfiqa.service.results import ImageResult
from crfiqa.service.runtime import images_in_flight
from crfiqa.service.settings import Settings

log = logging.getLogger("crfiqa.api")
#: Batched detection runs once a request's decoded images reach this many pixels (about 72 MB of RGB): a
#: request of 64 LFW-sized photos still forms one batch, and 64 large ones are never all held at once.
DETECT_PIXEL_BUDGET = 24_000_000
STALL_EXIT_CODE = 70  # EX_SOFTWARE: the orchestrator restarts the process


@dataclass
class Scored:
    """The results of one request's images and the wall time of its stages, seconds."""

    results: list[ImageResult]
    prepare_s: float
    quality_s: float
    prepared: list[Prepared] = field(default_factory=list)  # the images' crops (POST /v1/best embeds them)


class Service:
    """Models, thread pools, the batcher, keys and readiness of one app instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.keys = KeyStore(settings.key_list, settings.api_keys_file)
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.pipeline = Pipeline(settings.pipeline_settings())
        self.workers = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="crfiqa-prep")
        self.inference = ThreadPoolExecutor(settings.concurrent_batches, thread_name_prefix="crfiqa-quality")
        self.batcher = DynamicBatcher(
            self._infer, self.inference, settings.max_batch_size, settings.max_queue_delay_ms / 1000,
            settings.max_queue_size, on_batch=self.metrics.batch_size.observe, on_depth=self.metrics.queue_depth.set,
            concurrency=settings.concurrent_batches)
        self.warmed = False
        self.stalled = False
        self.stopping = threading.Event()  # set by close(): warm-up stops between calls
        self._processes: ProcessPoolExecutor | None = None
        self._embedder: RecognitionModel | None = None
        self._embedder_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """Warmed up, the batcher running and no batch stuck past ``inference_timeout_s``."""
        return self.warmed and not self.stalled and self.batcher.alive

    def check_ready(self) -> None:
        """Raise the typed 503 that says why the service is not ready."""
        if not self.warmed:
            raise RequestError("models are still warming up", code="not_ready")
        if self.stalled or not self.batcher.alive:
            raise RequestError(f"quality inference has been running for {self.batcher.stall_s():.0f} s",
                               code="inference_stalled")

    def load(self) -> None:
        """Verify (sha256) and open both models; raises a clear ``ModelError`` when one is missing or wrong.

        Opening a model through the pipeline resolves and verifies it, so each file is hashed once."""
        for role, info in self.pipeline.models().items():
            self.metrics.model_info.labels(info["name"], info["version"], info["provider"], role).set(1)

    def warm_up(self) -> None:
        """Run every batch size the batcher can form (the CUDA arena grows to the largest seen) and the detector."""
        sizes = sorted({min(2 ** k, self.settings.max_batch_size) for k in range(11)})
        crops = np.zeros((self.settings.max_batch_size, 112, 112, 3), np.uint8)
        side = self.settings.det_size or self.pipeline.detector.max_size  # unset: sized to the image, up to this
        blank = np.zeros((side, side, 3), np.uint8)
        for _ in range(self.settings.warmup_rounds):
            self.pipeline.detect(blank)
            for n in sizes:
                if self.stopping.is_set():  # SIGTERM while warming up: no need to finish
                    return
                self._infer(crops[:n])

    async def warm(self) -> None:
        """Warm up in the inference thread, then mark the service ready (a failure leaves it not ready)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.inference, self.warm_up)
        except Exception:
            log.exception("warm-up failed; the service stays not ready")
            return
        self.warmed = True
        self.metrics.ready.set(1)
        log.info("ready")

    async def watch(self, every_s: float = 0.1) -> None:
        """Watchdog: a batch running past ``inference_timeout_s`` makes the service not ready until it ends;
        past ``inference_stall_exit_s`` the process exits (its thread cannot be freed); a dead batcher restarts."""
        s = self.settings
        while True:
            await asyncio.sleep(every_s)
            if not self.batcher.alive:
                log.error("the batcher stopped unexpectedly; restarting it")
                self.batcher.restart()
            stall = self.batcher.stall_s()
            if stall > s.inference_timeout_s and not self.stalled:
                log.error("quality inference stalled: not ready", extra={"stall_s": round(stall, 1)})
            elif stall <= s.inference_timeout_s and self.stalled:
                log.info("quality inference recovered: ready again")
            self.stalled = stall > s.inference_timeout_s
            self.metrics.ready.set(1 if self.ready else 0)
            if s.inference_stall_exit_s and stall > s.inference_stall_exit_s:
                log.critical("quality inference stuck; exiting for a restart", extra={"stall_s": round(stall, 1)})
                logging.shutdown()
                os._exit(STALL_EXIT_CODE)  # a stuck thread cannot be joined: no clean exit is possible

    def processes(self) -> ProcessPoolExecutor:
        """The worker process that parses large JSON bodies (started on first use: most deployments send
        multipart and never pay for it)."""
        # A pool whose process died (killed, out of memory) refuses every later call: replace it. CPython sets
        # ``_broken`` (a message) when that happens and has no public accessor for it.
        if self._processes is not None and getattr(self._processes, "_broken", False):
            log.warning("the JSON parsing process died; starting a new one")
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None
        if self._processes is None:
            self._processes = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._processes

    def embedder(self) -> RecognitionModel:
        """The recognition adapter that groups ``/v1/best`` faces (verified and opened on first use: most
        deployments never call that endpoint)."""
        with self._embedder_lock:
            if self._embedder is None:
                try:
                    self._embedder, _ = create_embedder(self.pipeline, DEFAULT_EMBEDDER)
                except ModelError as exc:  # the deployment lacks it: this endpoint is unavailable, not broken
                    raise RequestError(f"POST /v1/best needs the recognition model {DEFAULT_EMBEDDER}: {exc.message}",
                                       code="model_unavailable", retry_after_s=60.0) from exc
            return self._embedder

    def close(self) -> None:
        """Stop the pools (after the batcher has stopped); a batch still running in its thread is not waited for
        (its requests were answered): uvicorn then re-raises SIGTERM, whose default action ends the process."""
        self.stopping.set()
        stall = self.batcher.stall_s()
        if stall > 0:
            log.warning("stopping with an inference call still running", extra={"stall_s": stall})
        self.workers.shutdown(wait=True)
        self.inference.shutdown(wait=stall == 0, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)

    def _infer(self, crops: np.ndarray) -> np.ndarray:
        """The pipeline's batch function on one batch (runs in the inference thread)."""
        t = time.perf_counter()
        raw = self.pipeline.score(crops)
        self.metrics.stage_duration.labels("quality").observe(time.perf_counter() - t)
        return raw

    def options(self, opts: Options) -> PipelineOptions:
        """The pipeline options of a request's options."""
        if opts.aligned:
            return PipelineOptions(aligned=True, components=opts.components)
        cap = self.settings.max_faces_per_image  # bounds the work one image can cause
        det = self.pipeline.detection_settings(max_faces=min(opts.max_faces or cap, cap),
                                               min_face_size=opts.min_face_size,
                                               score_threshold=opts.det_threshold)
        return PipelineOptions(select=opts.select, detection=det, components=opts.components)

    @staticmethod
    def _source(upload: Upload) -> tuple[str, bytes] | Prepared:
        """The pipeline source of an upload (base64 decoded), or a Prepared holding why there is none."""
        if upload.error is not None:
            return Prepared(upload.id, error=upload.error)
        try:
            return upload.id, decode_data(upload.data)
        except CrfiqaError as exc:
            return Prepared(upload.id, error=exc)

    def prepare(self, upload: Upload, opts: PipelineOptions) -> Prepared:
        """The pipeline's prepare stage for one uploaded image (base64 decoded first); never raises. The
        decoded pixels are released at once: a request's images wait for one another, and 64 large photos
        held until the last is scored would take gigabytes."""
        source = self._source(upload)
        return source if isinstance(source, Prepared) else self.pipeline.prepare(source, opts).release()

    def prepare_many(self, uploads: list[Upload], opts: PipelineOptions) -> list[Prepared]:
        """The pipeline's prepare_many over a request's images (the GPU path: one detector network call per
        input shape); an upload that fails to decode keeps its typed error and its place."""
        given = [self._source(u) for u in uploads]
        sources = [s for s in given if not isinstance(s, Prepared)]
        done = iter(self.pipeline.prepare_many(sources, opts, pixel_budget=DETECT_PIXEL_BUDGET, release=True))
        log.debug("batched detection", extra={"images": len(sources)})
        return [s if isinstance(s, Prepared) else next(done) for s in given]

    async def score(self, uploads: list[Upload], opts: Options) -> Scored:
        """Prepare images in parallel worker threads (on a GPU: a request's images in one batched detection),
        score all their faces in one batcher submission, finish each; a failed batch fails the images that had
        faces in it (typed, per image)."""
        # Declared for the solo sessions (runtime.SoloSession): only a lone one-image request uses every core.
        with images_in_flight(len(uploads)):
            loop = asyncio.get_running_loop()
            popts = self.options(opts)
            t0 = time.perf_counter()
            if self.pipeline.batch_detection and len(uploads) > 1 and not popts.aligned:
                prepared = await loop.run_in_executor(self.workers, self.prepare_many, uploads, popts)
            else:
                prepared = await asyncio.gather(*(loop.run_in_executor(self.workers, self.prepare, u, popts)
                                                  for u in uploads))
            t1 = time.perf_counter()
            crops = self.pipeline.batch_crops(prepared)
            if len(crops) > self.settings.max_queue_size:
                raise RequestError(f"{len(crops)} faces; the inference queue holds at most "
                                   f"{self.settings.max_queue_size}: send fewer images per request",
                                   code="too_many_faces")
            error: CrfiqaError | None = None
            raw = np.zeros(0)
            if len(crops):
                try:
                    raw = await self.batcher.submit(crops)
                except QueueFullError:
                    raise  # a whole-request 503
                except CrfiqaError as exc:
                    error = exc
            t2 = time.perf_counter()
            results = self.pipeline.finish_batch(prepared, None if error else raw, error=error)
            self.metrics.observe_images(prepared, results)
            return Scored(results, t1 - t0, t2 - t1, list(prepared))

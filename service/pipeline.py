"""The pipeline's stages: ``prepare`` one image (decode, detect, select, align), ``score`` a batch of crops,
``finish`` a result. The CLI, the HTTP service, the evaluator and the cluster job compose these three and
differ only in where a batch comes from (pytriton's shape: the batch function is what gets batched)."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, islice
from pathlib import Path

import cv2
import numpy as np

from crfiqa.service.align import ALIGNED_SIZE, ARCFACE_TEMPLATE, align_face, as_aligned
from crfiqa.service.components import face_components
from crfiqa.service.detect import Detector, DetectorSettings, create_detector
from crfiqa.service.detect.base import select_one
from crfiqa.service.errors import CrfiqaError, InferenceError
from crfiqa.service.facemodel import QualityModel
from crfiqa.service.imaging import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    decode_image,
    read_image,
)
from crfiqa.service.registry import Manifest, resolve
from crfiqa.service.results import Component, Detection, FaceResult, ImageResult, Quality
from crfiqa.service.runtime import DEFAULT_PROVIDERS, GPU_PROVIDERS, images_in_flight, select_providers

#: An input of ``prepare``: a path, a (name, encoded bytes) pair or a (name, decoded image) pair.
Source = str | Path | tuple[str, bytes] | tuple[str, DecodedImage]
NO_CROPS = np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
log = logging.getLogger("crfiqa.pipeline")


@dataclass(frozen=True)
class PipelineSettings:
    """Which models to run, on which providers, with which limits."""

    detector: str | None = None  # manifest name; None = the manifest default
    quality: str | None = None  # manifest name or .onnx path; None = the manifest default
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    detection: DetectorSettings = field(default_factory=DetectorSettings)
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 32
    models_dir: Path | None = None
    # Throughput comes from running images and batches side by side on single-threaded sessions (run()):
    # on 2 cores, one ORT thread per call cost the least CPU per image, and idle threads sleep (runtime.py).
    decode_workers: int = min(4, os.cpu_count() or 1)  # run(): threads preparing images
    score_workers: int = min(4, os.cpu_count() or 1)  # run(): quality batches scored at once
    intra_op_threads: int = 1  # ONNX Runtime threads per session call; 0 = one per core (lowest latency alone)
    # A call that starts while no other model call runs, with at most one image in flight, uses this many
    # threads instead (runtime.SoloSession): a lone image's latency. 0 here: a library caller running prepare
    # and score in its own threads opts in; the CLI and the service take CRFIQA_SOLO_THREADS (settings.py).
    solo_threads: int = 0
    # run(): detect batch_size images per network call (SCRFD; one call per input shape). None = when the first
    # provider is a GPU's: there one call per image leaves the device idle; on a CPU per-image calls side by
    # side already fill the cores.
    batch_detection: bool | None = None


@dataclass(frozen=True)
class Options:
    """Per-call choices: what the CLI flags and the API's query parameters set for a batch of images."""

    aligned: bool = False  # the input is an aligned 112x112 face: skip detection
    resize_aligned: bool = False  # with ``aligned``: accept other sizes and resize them (else ``not_aligned``)
    select: str | None = None  # center, largest, score: keep the one face an image of one subject is about
    detection: DetectorSettings | None = None  # None: the pipeline's detector settings
    components: bool = False  # also compute each face's quality components (service/components.py)


@dataclass
class Prepared:
    """One image after the CPU stages: its faces' detections and aligned crops, or the error that stopped it."""

    source: str
    image: DecodedImage | None = None
    detections: list[Detection] = field(default_factory=list)
    crops: np.ndarray = field(default_factory=lambda: NO_CROPS)
    error: CrfiqaError | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    components: list[dict[str, Component]] = field(default_factory=list)  # per face, with Options.components
    width: int = 0  # the decoded image's size (kept when ``release`` drops its pixels)
    height: int = 0

    def release(self) -> Prepared:
        """Drop the decoded pixels (a 40 MP photo holds 120 MB), keeping what scoring and the result need:
        crops, detections, size, error; a service holds many prepared images at once."""
        self.image = None
        return self


class Pipeline:
    """Detect, align and score faces; models load lazily, so ``detect`` never loads a quality model."""

    def __init__(self, settings: PipelineSettings | None = None, manifest: Manifest | None = None) -> None:
        self.settings = settings or PipelineSettings()
        self.manifest = manifest or Manifest.load()
        self.detector_name = self.settings.detector or self.manifest.defaults["detector"]
        self.quality_name = self.settings.quality or self.manifest.defaults["quality"]

    @cached_property
    def batch_detection(self) -> bool:
        """Whether ``run`` detects several images per network call (the setting, else: on a GPU)."""
        if self.settings.batch_detection is not None:
            return self.settings.batch_detection
        return select_providers(self.settings.providers)[0] in GPU_PROVIDERS

    @cached_property
    def detector(self) -> Detector:
        """The detector adapter (verified on first use); it reads its input spec from the manifest entry."""
        path, entry = resolve(self.detector_name, "detector", self.manifest, self.settings.models_dir)
        return create_detector(path, entry, self.settings.detection, self.settings.providers,
                               self.settings.intra_op_threads, batched=self.batch_detection,
                               solo_threads=self.settings.solo_threads)

    @cached_property
    def quality(self) -> QualityModel:
        """The quality model adapter (verified on first use)."""
        path, entry = resolve(self.quality_name, "quality", self.manifest, self.settings.models_dir)
        return QualityModel(path, entry, self.settings.providers, self.settings.intra_op_threads,
                            self.settings.batch_size, solo_threads=self.settings.solo_threads)

    def load(self, detector: bool = True, quality: bool = True) -> None:
        """Open (and verify) the models now, so a bad model fails the whole run before any image."""
        if detector:
            _ = self.detector
        if quality:
            _ = self.quality

    def models(self) -> dict[str, dict]:
        """Manifest data and execution provider of the detector and the quality model (``/v1/models``)."""
        det = self.manifest.get(self.detector_name, "detector")
        return {"detector": {**det.to_dict(), "provider": self.detector.provider},
                "quality": {**self.quality.entry.to_dict(), "provider": self.quality.provider}}

    def detection_settings(self, **overrides: float | int | None) -> DetectorSettings:
        """The detector's settings with the non-None ``overrides`` (max_faces, min_face_size, ...) applied."""
        return self.detector.settings.with_overrides(**overrides)

    # -- stage 1: per image, CPU work, safe to run in many threads --------------------------------------------

    def decode(self, source: Source) -> DecodedImage:
        """Decode one source with the configured limits."""
        if isinstance(source, tuple):
            data = source[1]
            if isinstance(data, DecodedImage):
                return data
            return decode_image(data, self.settings.max_bytes, self.settings.max_pixels)
        return read_image(source, self.settings.max_bytes, self.settings.max_pixels)

    def detect(self, rgb: np.ndarray, settings: DetectorSettings | None = None) -> list[Detection]:
        """Faces in an RGB image, ordered by score."""
        return self.detector.detect(rgb, settings)

    def prepare(self, source: Source, options: Options | None = None) -> Prepared:
        """Decode, detect, select and align one image; a bad image becomes ``Prepared.error``, never a raise."""
        opts = options or Options()
        prepared = self._decoded(source)
        if prepared.image is not None:
            self._faces(prepared, opts)
        return prepared

    def prepare_many(self, sources: Sequence[Source], options: Options | None = None, *, pixel_budget: int = 0,
                     release: bool = False) -> list[Prepared]:
        """``prepare`` for several images with one detector network call per input shape (a batched SCRFD;
        other detectors, or a failed batch call, detect image by image): the same results, in order.
        ``pixel_budget`` > 0: detection runs whenever the decoded images waiting for it reach that many pixels,
        and with ``release`` their pixels are freed once their crops exist, so many large photos are not all
        held at once."""
        opts = options or Options()
        batch: list[Prepared] = []
        waiting: list[Prepared] = []
        pixels = 0
        for source in sources:
            prepared = self._decoded(source)
            batch.append(prepared)
            if prepared.image is not None:
                waiting.append(prepared)
                pixels += prepared.width * prepared.height
            if pixel_budget and pixels >= pixel_budget:
                self._detect_all(waiting, opts, release)
                waiting, pixels = [], 0
        self._detect_all(waiting, opts, release)
        return batch

    def _detect_all(self, ready: list[Prepared], opts: Options, release: bool) -> None:
        """Detect, select and align decoded images (one detector call per input shape where it can batch)."""
        found: list[list[Detection] | None] = [None] * len(ready)
        detect_many = getattr(self.detector, "detect_many", None) if ready and not opts.aligned else None
        if detect_many is not None:
            t = time.perf_counter()
            try:
                found = list(detect_many([p.image.rgb for p in ready if p.image is not None], opts.detection))
            except Exception:  # ORT raises untyped errors; image by image, each failure stays typed
                log.warning("batched detection failed; detecting image by image", exc_info=True)
            else:
                share = (time.perf_counter() - t) / len(ready)
                for p in ready:
                    p.timings["detect"] = share
        for p, dets in zip(ready, found, strict=True):
            self._faces(p, opts, dets)
            if release:
                p.release()

    def _decoded(self, source: Source) -> Prepared:
        """A Prepared holding the decoded image, or the decoding error."""
        prepared = Prepared(source[0] if isinstance(source, tuple) else str(source))
        t0 = time.perf_counter()
        try:
            prepared.image = self.decode(source)
            prepared.width, prepared.height = prepared.image.width, prepared.image.height
        except CrfiqaError as exc:
            prepared.error = exc
        prepared.timings["decode"] = time.perf_counter() - t0
        return prepared

    def _faces(self, prepared: Prepared, opts: Options, found: list[Detection] | None = None) -> None:
        """Detect (unless ``found`` holds this image's detections already), select, align and measure the
        components of a decoded image, in place; a typed error stops it."""
        image = prepared.image
        assert image is not None
        try:
            t1 = time.perf_counter()
            if opts.aligned:
                prepared.detections, prepared.crops = _as_aligned_face(image, opts.resize_aligned)
            else:
                dets = self.detect(image.rgb, opts.detection) if found is None else found
                if opts.select:
                    dets = select_one(dets, image.width, image.height, opts.select)
                t2 = time.perf_counter()
                if found is None:
                    prepared.timings["detect"] = t2 - t1
                prepared.detections = dets
                if dets:
                    try:
                        prepared.crops = np.stack([align_face(image.rgb, d.landmarks) for d in dets])
                    except (ValueError, np.linalg.LinAlgError) as exc:  # landmarks no similarity maps (coincident, NaN)
                        raise CrfiqaError(f"cannot align a face: {exc}", code="align_error") from exc
                prepared.timings["align"] = time.perf_counter() - t2
            if opts.components:
                t3 = time.perf_counter()
                prepared.components = [face_components(image.rgb, d, c)
                                       for d, c in zip(prepared.detections, prepared.crops)]
                prepared.timings["components"] = time.perf_counter() - t3
        except CrfiqaError as exc:
            prepared.error = exc

    # -- stage 2: the batch function ---------------------------------------------------------------------------

    def score(self, crops: np.ndarray) -> np.ndarray:
        """Raw quality [N] of aligned RGB uint8 crops [N,112,112,3]; raises ``InferenceError``."""
        return self.quality.predict(crops)

    # -- stage 3: per image ------------------------------------------------------------------------------------

    def finish(self, prepared: Prepared, raw: np.ndarray | None = None,
               error: CrfiqaError | None = None) -> ImageResult:
        """The typed result: detections with calibrated quality (``raw`` is this image's slice; None = not
        scored); ``error`` (a failed batch) replaces the faces."""
        width, height = prepared.width, prepared.height
        error = prepared.error or (error if len(prepared.detections) else None)
        if error is not None:
            return ImageResult(prepared.source, error=error, width=width, height=height)
        faces = [FaceResult(d) for d in prepared.detections]
        for face, components in zip(faces, prepared.components):
            face.components = components
        if raw is not None:
            if len(raw) != len(faces):
                raise ValueError(f"{len(raw)} quality values for {len(faces)} faces")
            if not np.isfinite(raw).all():  # a score would be NaN: this image fails, typed, not the response
                return ImageResult(prepared.source, width=width, height=height, error=InferenceError(
                    "the quality model returned a non-finite value for a face of this image"))
            for face, r, s in zip(faces, raw, self.quality.score(raw)):
                face.quality = Quality(float(r), float(s))
        return ImageResult(prepared.source, faces, width=width, height=height)

    # -- compositions of the stages ----------------------------------------------------------------------------

    @staticmethod
    def batch_crops(batch: Sequence[Prepared]) -> np.ndarray:
        """The crops of several prepared images as one batch, in order (what ``finish_batch`` splits)."""
        crops = [p.crops for p in batch if len(p.crops)]
        return np.concatenate(crops) if crops else NO_CROPS

    def finish_batch(self, batch: Sequence[Prepared], raw: np.ndarray | None = None,
                     error: CrfiqaError | None = None) -> list[ImageResult]:
        """Finish each image with its slice of ``raw`` (the quality of ``batch_crops(batch)``; None = not
        scored); ``error`` (a failed batch) fails only the images that had faces in it."""
        if raw is None:
            return [self.finish(p, error=error) for p in batch]
        offsets = np.cumsum([0, *(len(p.crops) for p in batch)])
        return [self.finish(p, raw[a:b]) for p, a, b in zip(batch, offsets[:-1], offsets[1:])]

    def score_prepared(self, batch: Sequence[Prepared]) -> list[ImageResult]:
        """Score the faces of several prepared images in one batch call and finish each."""
        crops = self.batch_crops(batch)
        if not len(crops):
            return self.finish_batch(batch)
        try:
            raw = self.score(crops)
        except CrfiqaError as exc:
            return self.finish_batch(batch, error=exc)
        return self.finish_batch(batch, raw)

    def run(self, sources: Iterable[Source], options: Options | None = None,
            score: bool = True) -> Iterator[tuple[ImageResult, Prepared]]:
        """Results in input order. ``prepare`` runs ahead in ``decode_workers`` threads while up to
        ``score_workers`` quality batches run at once, so decode/detect/align of the next images overlap
        inference of the previous ones and every core stays busy (each session call is single-threaded by
        default: parallel work across images costs less CPU than threads inside one call). A model that
        cannot be loaded fails the whole run here (ModelError), never image by image."""
        opts = options or Options()
        self.load(detector=not opts.aligned, quality=score)
        scorers = max(1, self.settings.score_workers)
        window = max(2 * self.settings.batch_size, 2 * self.settings.decode_workers)
        it = iter(sources)
        head = list(islice(it, 2))
        it = chain(head, it)
        pending: deque[Future[Prepared]] = deque()
        scoring: deque[tuple[list[Prepared], Future[list[ImageResult]]]] = deque()
        # One image alone may take the solo sessions (all cores in each call); many overlap one another instead.
        with images_in_flight(len(head)), \
                ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="crfiqa-prepare") as pool, \
                ThreadPoolExecutor(scorers, thread_name_prefix="crfiqa-score") as score_pool:

            step = self.settings.batch_size if self.batch_detection and not opts.aligned else 1

            def fill() -> None:
                while len(pending) < window:
                    chunk = list(islice(it, step))
                    if not chunk:
                        return
                    if step == 1:
                        pending.append(pool.submit(self.prepare, chunk[0], opts))
                    else:  # one batched detection per chunk, handed on image by image
                        pending.extend(_each(pool.submit(self.prepare_many, chunk, opts), len(chunk)))

            fill()
            while pending or scoring:
                # Hand back the oldest batch when it is done, when every scorer is busy, or at the end.
                if scoring and (scoring[0][1].done() or len(scoring) >= scorers or not pending):
                    batch, done = scoring.popleft()
                    yield from zip(done.result(), batch)
                    continue
                batch = []
                faces = 0
                # Take finished images in order until a batch is full or nothing more is ready.
                while pending and (not batch or (faces < self.settings.batch_size and pending[0].done())):
                    batch.append(pending.popleft().result())
                    faces += len(batch[-1].crops)
                    fill()
                if score and faces:
                    scoring.append((batch, score_pool.submit(self.score_prepared, batch)))
                else:
                    results = self.score_prepared(batch) if score else self.finish_batch(batch)
                    scoring.append((batch, _done(results)))

    def assess(self, image: str | Path | bytes | np.ndarray, options: Options | None = None,
               colour: str | None = None) -> ImageResult:
        """Score every face of one image: a path, encoded bytes, or an HxWx3 uint8 array whose channel order
        must be given (``colour="RGB"`` or ``"BGR"``, as OpenCV reads). Like insightface's ``FaceAnalysis.get``."""
        source: Source
        if isinstance(image, np.ndarray):
            source = ("array", DecodedImage(_rgb_array(image, colour), "array"))
        elif isinstance(image, bytes | bytearray):
            source = ("bytes", bytes(image))
        else:
            source = image
        self.load(detector=not (options and options.aligned))
        return self.score_prepared([self.prepare(source, options)])[0]


def _each(whole: Future[list[Prepared]], n: int) -> list[Future[Prepared]]:
    """One future per image of a ``prepare_many`` future, each done when the whole is."""
    parts: list[Future[Prepared]] = [Future() for _ in range(n)]

    def hand_on(done: Future[list[Prepared]]) -> None:
        if done.cancelled():
            for part in parts:
                part.cancel()
            return
        exc = done.exception()
        for k, part in enumerate(parts):
            if exc is not None:
                part.set_exception(exc)
            else:
                part.set_result(done.result()[k])

    whole.add_done_callback(hand_on)
    return parts


def _done(results: list[ImageResult]) -> Future[list[ImageResult]]:
    """A future that already holds ``results`` (a batch without faces needs no scorer)."""
    future: Future[list[ImageResult]] = Future()
    future.set_result(results)
    return future


def _rgb_array(image: np.ndarray, colour: str | None) -> np.ndarray:
    """The array as C-contiguous RGB uint8 (converted from BGR, or as it is when already so)."""
    if colour not in ("RGB", "BGR"):
        raise ValueError("say the array's channel order: colour='RGB' or colour='BGR' (OpenCV reads BGR)")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if colour == "BGR" else image
    return np.ascontiguousarray(rgb)


def _as_aligned_face(image: DecodedImage, resize: bool) -> tuple[list[Detection], np.ndarray]:
    """The whole image as one aligned face; anything but 112x112 is ``not_aligned`` unless ``resize``."""
    h, w = image.height, image.width
    if (h, w) != (ALIGNED_SIZE, ALIGNED_SIZE) and not resize:
        raise CrfiqaError(f"image is {w}x{h}; an aligned face is {ALIGNED_SIZE}x{ALIGNED_SIZE} (detect it instead, "
                          "or allow resizing explicitly)", code="not_aligned")
    # The face is taken as aligned: its landmarks are the template's, in this image's scale.
    landmarks = (ARCFACE_TEMPLATE * [w / ALIGNED_SIZE, h / ALIGNED_SIZE]).astype(np.float32)
    det = Detection(bbox=np.array([0, 0, w, h], dtype=np.float32), landmarks=landmarks, score=1.0)
    return [det], as_aligned(image.rgb)[None]

"""Compose decode -> detect -> align -> quality: the in-process API the CLI, the server and the evaluator call."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from crfiqa.service.align import ALIGNED_SIZE, ARCFACE_TEMPLATE, align_face, as_aligned
from crfiqa.service.detect import Detector, DetectorSettings, create_detector
from crfiqa.service.detect.base import select_one
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, decode_image, read_image
from crfiqa.service.registry import Manifest, resolve
from crfiqa.service.facemodel import QualityModel
from crfiqa.service.results import Detection, FaceResult, ImageResult, Quality
from crfiqa.service.runtime import DEFAULT_PROVIDERS

#: An input is a path, or a (name, bytes) pair.
Source = str | Path | tuple[str, bytes]


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
    decode_workers: int = min(4, os.cpu_count() or 1)
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = one per core


class Pipeline:
    """Detect, align and score faces; models load lazily, so ``detect`` never loads a quality model."""

    def __init__(self, settings: PipelineSettings | None = None, manifest: Manifest | None = None) -> None:
        self.settings = settings or PipelineSettings()
        self.manifest = manifest or Manifest.load()
        self.detector_name = self.settings.detector or self.manifest.defaults["detector"]
        self.quality_name = self.settings.quality or self.manifest.defaults["quality"]

    @cached_property
    def detector(self) -> Detector:
        """The detector adapter (verified on first use)."""
        path, entry = resolve(self.detector_name, "detector", self.manifest, self.settings.models_dir)
        det = self.settings.detection
        if entry.detector_size and det.input_size == DetectorSettings().input_size:
            det = det.with_overrides(input_size=entry.detector_size)
        return create_detector(path, entry, det, self.settings.providers, self.settings.intra_op_threads)

    @cached_property
    def quality(self) -> QualityModel:
        """The quality model adapter (verified on first use)."""
        path, entry = resolve(self.quality_name, "quality", self.manifest, self.settings.models_dir)
        return QualityModel(path, entry, self.settings.providers, self.settings.intra_op_threads)

    def decode(self, source: Source) -> DecodedImage:
        """Decode one source with the configured limits."""
        if isinstance(source, tuple):
            return decode_image(source[1], self.settings.max_bytes, self.settings.max_pixels)
        return read_image(source, self.settings.max_bytes, self.settings.max_pixels)

    def detect(self, rgb: np.ndarray, settings: DetectorSettings | None = None) -> list[Detection]:
        """Faces in an RGB image, ordered by score."""
        return self.detector.detect(rgb, settings)

    @staticmethod
    def align(rgb: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
        """Aligned 112x112 RGB crops [N,112,112,3] for the detections."""
        if not detections:
            return np.zeros((0, 112, 112, 3), dtype=np.uint8)
        return np.stack([align_face(rgb, d.landmarks) for d in detections])

    def score_crops(self, crops: np.ndarray) -> list[Quality]:
        """Quality of aligned crops, run in batches of ``batch_size``."""
        raws = [self.quality.predict(crops[i:i + self.settings.batch_size])
                for i in range(0, len(crops), self.settings.batch_size)]
        raw = np.concatenate(raws) if raws else np.zeros(0)
        scores = self.quality.score(raw)
        return [Quality(float(r), float(s)) for r, s in zip(raw, scores)]

    def analyse(self, image: DecodedImage, aligned: bool = False, settings: DetectorSettings | None = None,
                select: str | None = None) -> tuple[list[Detection], np.ndarray]:
        """Detections and their aligned crops; ``aligned`` treats the whole image as one aligned face;
        ``select`` (center, largest, score) keeps the one face an image of one subject is about."""
        if aligned:
            crop = as_aligned(image.rgb)
            h, w = image.height, image.width
            # The face is taken as aligned: its landmarks are the template's, in this image's scale.
            landmarks = (ARCFACE_TEMPLATE * [w / ALIGNED_SIZE, h / ALIGNED_SIZE]).astype(np.float32)
            det = Detection(bbox=np.array([0, 0, w, h], dtype=np.float32), landmarks=landmarks, score=1.0)
            return [det], crop[None]
        dets = self.detect(image.rgb, settings)
        if select:
            dets = select_one(dets, image.width, image.height, select)
        return dets, self.align(image.rgb, dets)

    def run(self, sources: Iterable[Source], score: bool = True, aligned: bool = False,
            settings: DetectorSettings | None = None, chunk: int = 64,
            select: str | None = None) -> Iterator[tuple[ImageResult, np.ndarray]]:
        """Process sources in order, yielding each result with its crops; decoding runs in parallel threads
        while the models run, and quality is batched across the images of a chunk. A model that cannot be
        loaded fails the whole run here (ModelError), never image by image."""
        if not aligned:
            _ = self.detector
        if score:
            _ = self.quality
        it = iter(sources)
        with ThreadPoolExecutor(self.settings.decode_workers) as pool:
            while True:
                batch = [s for _, s in zip(range(chunk), it)]
                if not batch:
                    return
                decoded = pool.map(_safe(self.decode), batch)
                results: list[ImageResult] = []
                crops: list[np.ndarray] = []
                for source, image in zip(batch, decoded):
                    name = source[0] if isinstance(source, tuple) else str(source)
                    if isinstance(image, CrfiqaError):
                        results.append(ImageResult(name, error=image))
                        crops.append(np.zeros((0, 112, 112, 3), np.uint8))
                        continue
                    try:
                        dets, face_crops = self.analyse(image, aligned, settings, select)
                    except CrfiqaError as exc:
                        results.append(ImageResult(name, error=exc, width=image.width, height=image.height))
                        crops.append(np.zeros((0, 112, 112, 3), np.uint8))
                        continue
                    results.append(ImageResult(name, [FaceResult(d) for d in dets], width=image.width,
                                               height=image.height))
                    crops.append(face_crops)
                if score:
                    self._score_into(results, crops)
                yield from zip(results, crops)

    def _score_into(self, results: list[ImageResult], crops: list[np.ndarray]) -> None:
        """Score all crops of a chunk in shared batches and attach the qualities to their faces."""
        counts = [len(c) for c in crops]
        if sum(counts) == 0:
            return
        try:
            qualities = self.score_crops(np.concatenate([c for c in crops if len(c)]))
        except CrfiqaError as exc:
            for r, n in zip(results, counts):
                if n:
                    r.error, r.faces = exc, []
            return
        k = 0
        for r, n in zip(results, counts):
            for face in r.faces:
                face.quality = qualities[k]
                k += 1


def _safe(fn):
    """Wrap ``fn`` so a typed error is returned instead of raised (keeps ``pool.map`` going)."""

    def call(arg):
        try:
            return fn(arg)
        except CrfiqaError as exc:
            return exc

    return call

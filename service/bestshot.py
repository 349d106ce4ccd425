"""Best shot: group the faces of a burst, folders or videos into identities and pick each identity's best face.

Faces come from the pipeline's stages (``Pipeline.run`` with components: decode, detect, align, score); their
identity embeddings from the recognition adapter (``facemodel.RecognitionModel``) on the same aligned crops,
so nothing here preprocesses a face. Identities are formed greedily: faces in order of quality join the
identity whose mean embedding is most similar when the cosine similarity reaches the threshold, else start
a new one; the best-quality face seeds each identity, so degraded shots attach to a clean one.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from crfiqa.service.errors import CrfiqaError, DecodeError
from crfiqa.service.facemodel import RecognitionModel
from crfiqa.service.imaging import IMAGE_EXTENSIONS, DecodedImage, is_utf8_name, list_images
from crfiqa.service.pipeline import Options, Pipeline, Prepared, Source
from crfiqa.service.registry import resolve
from crfiqa.service.results import Component, ImageResult, Quality

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"})
DEFAULT_EMBEDDER = "w600k_mbf"
#: Cosine-similarity thresholds per embedder, measured on the LFW dev images (benchmarks/bestshot_threshold.py;
#: table in docs/components.md): FMR over all 1.2 M cross-identity pairs / FNMR on the 500 genuine pairs =
#: w600k_mbf 4.1e-5 / 1.4 %. crfiqa_mbf v2's embedding output is w600k_mbf's, unchanged (its backbone is frozen),
#: so it shares the threshold (v1's fine-tuned embedding needed 0.40).
DEFAULT_THRESHOLDS: dict[str, float] = {"w600k_mbf": 0.30, "crfiqa_mbf": 0.30}
EMBED_CHUNK = 64  # faces embedded per adapter call


@dataclass
class Shot:
    """One face of one image or video frame, with its quality, components and unit embedding."""

    path: str
    frame: int | None
    face: int
    bbox: list[float]
    quality: Quality
    components: dict[str, Component] | None
    embedding: np.ndarray = field(repr=False)

    def to_dict(self, key: str = "path") -> dict:
        """JSON form: ``{"path", "frame"?, "face", "bbox", "quality", "components"}`` (``key`` names the source
        field: ``path`` in the CLI, ``id`` in the API)."""
        out: dict = {key: self.path}
        if self.frame is not None:
            out["frame"] = self.frame
        out["face"] = self.face
        out["bbox"] = [round(v, 2) for v in self.bbox]
        out["quality"] = self.quality.to_dict()
        out["components"] = ({n: c.to_dict() for n, c in self.components.items()}
                             if self.components is not None else None)
        return out


@dataclass
class Identity:
    """The shots of one person, best first."""

    shots: list[Shot]

    def to_dict(self, k: int, key: str = "path") -> dict:
        """One output line: ``{"identity", "count", "best", "runner_up"}``."""
        return {"identity": k, "count": len(self.shots), "best": self.shots[0].to_dict(key),
                "runner_up": self.shots[1].to_dict(key) if len(self.shots) > 1 else None}


def create_embedder(pipe: Pipeline, name: str = DEFAULT_EMBEDDER) -> tuple[RecognitionModel, str]:
    """The recognition adapter for ``name``: a recognition model of the manifest, or ``quality`` for the
    quality model's own ``embedding`` output; returns (adapter, resolved model name)."""
    s = pipe.settings
    if name == "quality":
        path, entry = resolve(pipe.quality_name, "quality", pipe.manifest, s.models_dir)
        if "embedding" not in entry.outputs:
            raise CrfiqaError(f"quality model {entry.name} declares no embedding output; use a recognition "
                              "model (--embedder w600k_mbf)", code="no_embedding")
    else:
        path, entry = resolve(name, "recognition", pipe.manifest, s.models_dir)
    return RecognitionModel(path, entry, s.providers, s.intra_op_threads, s.batch_size,
                            solo_threads=s.solo_threads), entry.name


def expand(paths: Iterable[str | Path], every: int = 1) -> Iterator[tuple[str, int | None, Source | CrfiqaError]]:
    """(path, frame, source) for every image file and every ``every``-th frame of every video under ``paths``
    (folders recursively, each file once); a video that cannot be opened yields its error instead of a source."""
    for f in list_images(paths, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS):
        if f.suffix.lower() in VIDEO_EXTENSIONS:
            yield from _video_frames(f, every)
        else:
            yield str(f), None, f


def _video_frames(path: Path, every: int) -> Iterator[tuple[str, int | None, Source | CrfiqaError]]:
    """Every ``every``-th frame of a video as an RGB image source, read with OpenCV."""
    with contextlib.ExitStack() as stack:
        opened = str(path)
        if not is_utf8_name(opened):  # OpenCV would crash (SIGSEGV) on the name: open a link to it
            link = Path(stack.enter_context(tempfile.TemporaryDirectory())) / f"video{path.suffix}"
            link.symlink_to(path.absolute())
            opened = str(link)
        yield from _read_frames(cv2.VideoCapture(opened), path, every)


def _read_frames(cap: cv2.VideoCapture, path: Path, every: int) -> Iterator[tuple[str, int | None, Source | CrfiqaError]]:
    """The frames of an opened capture (released at the end), named after ``path``."""
    try:
        if not cap.isOpened():
            yield str(path), None, DecodeError(f"cannot open video {path}", code="unreadable")
            return
        index = 0
        while True:
            ok = cap.grab()
            if not ok:
                break
            if index % every == 0:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    name = f"{path}#frame={index}"
                    yield str(path), index, (name, DecodedImage(rgb, "video"))
            index += 1
        if index == 0:
            yield str(path), None, DecodeError(f"video {path} has no readable frame", code="unreadable")
    finally:
        cap.release()


def collect(pipe: Pipeline, embedder: RecognitionModel,
            frames: Iterable[tuple[str, int | None, Source | CrfiqaError]],
            options: Options | None = None) -> tuple[list[Shot], list[ImageResult]]:
    """Run the pipeline (with components) over the frames; returns every scored face as a Shot and the
    results of inputs that failed (typed errors, nothing lost)."""
    opts = options or Options(components=True)
    where: dict[str, tuple[str, int | None]] = {}
    errors: list[ImageResult] = []

    def sources() -> Iterator[Source]:
        for path, frame, source in frames:
            if isinstance(source, CrfiqaError):
                errors.append(ImageResult(path, error=source))
                continue
            name = source[0] if isinstance(source, tuple) else str(source)
            where[name] = (path, frame)
            yield source

    shots: list[Shot] = []
    pending: list[tuple[Shot, np.ndarray]] = []
    for result, prepared in pipe.run(sources(), opts):
        if not result.ok:
            errors.append(result)
            continue
        path, frame = where.pop(result.source, (result.source, None))
        pending.extend(unembedded(result, prepared, path, frame))
        if len(pending) >= EMBED_CHUNK:
            shots.extend(embed(embedder, pending))
            pending.clear()
    shots.extend(embed(embedder, pending))
    return shots, errors


def unembedded(result: ImageResult, prepared: Prepared, path: str, frame: int | None = None,
               ) -> list[tuple[Shot, np.ndarray]]:
    """The scored faces of one finished image as (shot without embedding, aligned crop) pairs."""
    out = []
    for k, (face, crop) in enumerate(zip(result.faces, prepared.crops)):
        if face.quality is not None:
            bbox = [float(v) for v in face.detection.bbox]
            out.append((Shot(path, frame, k, bbox, face.quality, face.components, np.zeros(0)), crop))
    return out


def embed(embedder: RecognitionModel, pending: list[tuple[Shot, np.ndarray]]) -> list[Shot]:
    """Give each shot the unit embedding of its crop (one adapter call for all)."""
    if not pending:
        return []
    emb = embedder.embed(np.stack([crop for _, crop in pending]))
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    for (shot, _), e in zip(pending, emb):
        shot.embedding = e
    return [shot for shot, _ in pending]


def group(shots: list[Shot], threshold: float) -> list[Identity]:
    """Identities by greedy centroid clustering in order of quality; ordered by count, then best quality."""
    # Raw quality, not the 0-100 score: the calibration saturates near 100, where good shots would tie.
    order = sorted(range(len(shots)), key=lambda i: -shots[i].quality.raw)  # stable: input order on ties
    members: list[list[Shot]] = []
    sums: list[np.ndarray] = []
    centroids = np.zeros((0, 0), np.float32)
    for i in order:
        e = shots[i].embedding
        if members:
            sims = centroids @ e
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                members[j].append(shots[i])
                sums[j] = sums[j] + e
                centroids[j] = sums[j] / np.linalg.norm(sums[j])
                continue
        members.append([shots[i]])
        sums.append(e.astype(np.float64))
        centroids = np.vstack([centroids, e[None]]) if len(centroids) else e[None].copy()
    identities = [Identity(m) for m in members]  # members are already best-first
    identities.sort(key=lambda ident: (-len(ident.shots), -ident.shots[0].quality.raw))
    return identities


def default_threshold(embedder: str) -> float:
    """The measured identity threshold of a (resolved) embedder name; a typed error when none was measured."""
    if embedder not in DEFAULT_THRESHOLDS:
        raise CrfiqaError(f"no measured identity threshold for {embedder}; pass one (--threshold)",
                          code="bad_argument")
    return DEFAULT_THRESHOLDS[embedder]


def best_shots(pipe: Pipeline, paths: Iterable[str | Path], every: int = 1, embedder: str = DEFAULT_EMBEDDER,
               threshold: float | None = None, options: Options | None = None,
               ) -> tuple[list[Identity], list[ImageResult]]:
    """Identities (best shot first) over image files, folders and videos; plus the inputs that failed.
    ``options`` are the pipeline's (components are always computed)."""
    if every < 1:
        raise CrfiqaError(f"--every must be >= 1, not {every}", code="bad_argument")
    adapter, resolved = create_embedder(pipe, embedder)
    threshold = default_threshold(resolved) if threshold is None else threshold
    opts = replace(options or Options(), components=True)
    shots, errors = collect(pipe, adapter, expand(paths, every), opts)
    return group(shots, threshold), errors

"""What an evaluation measures on each image: one aligned face (the selection rule), recognition
embeddings (cached on disk) and qualities from models, score CSV files or baselines."""

from __future__ import annotations

import csv
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from crfiqa.evaluation.protocols import Protocol
from crfiqa.service.align import ALIGNMENT_VERSION
from crfiqa.service.detect.base import select_index
from crfiqa.service.facemodel import QualityModel, RecognitionModel
from crfiqa.service.pipeline import Pipeline
from crfiqa.service.registry import Calibration, resolve
from crfiqa.service.results import Detection

BASELINES = ("random", "det_score", "eye_distance", "sharpness", "embedding_norm", "lightqnet")
FAILURE_QUALITY = -1.0  # NIST FATE Quality: a failure to assess scores -1 for every method


@dataclass
class Faces:
    """The one face per image an evaluation uses (``ok`` False: no face, the image failed)."""

    crops: np.ndarray  # [N,112,112,3] RGB uint8, zeros where not ok
    ok: np.ndarray  # [N] bool
    det_score: np.ndarray
    eye_distance: np.ndarray
    detections: list[Detection | None]
    sizes: list[tuple[int, int]]  # (width, height)
    keys: list[str]  # sha256 of each image's bytes

    @property
    def failures(self) -> int:
        """Images where no face was found (or decoding failed)."""
        return int((~self.ok).sum())


def find_faces(protocol: Protocol, pipeline: Pipeline, select: str) -> Faces:
    """Decode, detect, select one face per image, align; parallel decoding, a progress bar on stderr."""
    n = len(protocol.names)
    sources = [(name, src) if isinstance(src, bytes) else src for name, src in zip(protocol.names, protocol.sources)]
    crops = np.zeros((n, 112, 112, 3), np.uint8)
    ok = np.zeros(n, bool)
    det, eyes = np.zeros(n), np.zeros(n)
    dets: list[Detection | None] = [None] * n
    sizes: list[tuple[int, int]] = [(0, 0)] * n
    results = pipeline.run(sources, score=False)
    for k, (result, prepared) in enumerate(tqdm(results, total=n, desc="faces", unit="img", file=sys.stderr)):
        sizes[k] = (result.width, result.height)
        idx = select_index([f.detection for f in result.faces], result.width, result.height, select)
        if idx is None:
            continue
        chosen = result.faces[idx].detection
        crops[k], ok[k], dets[k] = prepared.crops[idx], True, chosen
        det[k] = chosen.score
        eyes[k] = float(np.hypot(*(chosen.landmarks[1] - chosen.landmarks[0])))
    keys = [hashlib.sha256(src if isinstance(src, bytes) else Path(src).read_bytes()).hexdigest()
            for src in protocol.sources]
    return Faces(crops, ok, det, eyes, dets, sizes, keys)


def recognition_model(name: str, pipeline: Pipeline) -> RecognitionModel:
    """A recognition model from the manifest (or an .onnx path)."""
    path, entry = resolve(name, "recognition", pipeline.manifest, pipeline.settings.models_dir)
    return RecognitionModel(path, entry, pipeline.settings.providers)


def embed(faces: Faces, model: RecognitionModel, flip_concat: bool, cache: Path | None, setting: str) -> np.ndarray:
    """Embeddings [N,D] (NaN rows for failures); ``flip_concat`` concatenates each face's and its mirror's.

    Cached per image under ``cache`` keyed by the file hash, the model's sha256, ``setting`` (detector,
    detection size, selection rule), the alignment version and the flip mode."""
    tag = hashlib.sha256(f"{model.entry.sha256}|{setting}|align{ALIGNMENT_VERSION}|flip{int(flip_concat)}".encode()).hexdigest()[:16]
    out: list[np.ndarray | None] = [None] * len(faces.keys)
    todo = []
    for k, key in enumerate(faces.keys):
        path = cache / f"{key}_{tag}.npy" if cache else None
        if path is not None and path.exists():
            out[k] = np.load(path)
        elif faces.ok[k]:
            todo.append(k)
    if todo:  # FaceModel.run chunks by itself
        crops = faces.crops[todo]
        emb = model.embed(crops)
        if flip_concat:
            emb = np.concatenate([emb, model.embed(np.ascontiguousarray(crops[:, :, ::-1]))], axis=1)
        for k, e in zip(todo, emb):
            out[k] = e
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                np.save(cache / f"{faces.keys[k]}_{tag}.npy", e)
    dim = next((e.shape[0] for e in out if e is not None), 1)
    return np.stack([e if (e is not None and faces.ok[k]) else np.full(dim, np.nan, np.float32)
                     for k, e in enumerate(out)])


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey aligned face (a classic blur measure)."""
    return float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def baseline(name: str, faces: Faces, pipeline: Pipeline, seed: int = 0) -> np.ndarray:
    """Quality of each image by a built-in baseline (``embedding_norm:<recognition model>``)."""
    kind, _, arg = name.partition(":")
    n = len(faces.keys)
    if kind == "random":
        q = np.random.default_rng([seed, 1]).random(n)  # not the stream the bootstrap draws from with the seed
    elif kind == "det_score":
        q = faces.det_score.copy()
    elif kind == "eye_distance":
        q = faces.eye_distance.copy()
    elif kind == "sharpness":
        q = np.array([sharpness(c) if o else 0.0 for c, o in zip(faces.crops, faces.ok)])
    elif kind == "embedding_norm":
        model = recognition_model(arg or "w600k_mbf", pipeline)
        q = np.zeros(n)
        idx = np.flatnonzero(faces.ok)
        q[idx] = np.linalg.norm(model.embed(faces.crops[idx]), axis=1)
    elif kind == "lightqnet":  # the published LightQNet (evaluation/lightqnet.py): dm100 (default), dm050 or a path
        from crfiqa.evaluation.lightqnet import find_model, lightqnet_quality
        from crfiqa.service.registry import models_dir

        dirs = [d for d in (pipeline.settings.models_dir, models_dir()) if d is not None]
        q = np.zeros(n)
        idx = np.flatnonzero(faces.ok)
        q[idx] = lightqnet_quality(find_model(arg, dirs), faces.crops[idx], pipeline.settings.providers)
    else:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return np.where(faces.ok, q, FAILURE_QUALITY)


def model_quality(spec: str, faces: Faces, pipeline: Pipeline) -> tuple[np.ndarray, Calibration]:
    """Raw quality from a quality model (manifest name or .onnx path) on the selected faces, and the
    model's 0-100 calibration."""
    path, entry = resolve(spec, "quality", pipeline.manifest, pipeline.settings.models_dir)
    model = QualityModel(path, entry, pipeline.settings.providers)
    q = np.full(len(faces.keys), FAILURE_QUALITY)
    idx = np.flatnonzero(faces.ok)
    q[idx] = model.predict(faces.crops[idx])
    return q, entry.calibration


def csv_quality(path: str | Path, protocol: Protocol, faces: Faces, select: str) -> np.ndarray:
    """Quality from a CSV: ``path,quality`` columns, or the one-row-per-face CSV of ``crfiqa score --out``
    (the row of each image chosen by the selection rule). Paths match by their ending."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: empty")
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        by_path.setdefault(row["path"].replace("\\", "/"), []).append(row)
    # Every "/"-bounded ending of every CSV path -> its rows (the first CSV path with that ending wins):
    # one dict lookup per image instead of a scan of the whole CSV.
    by_ending: dict[str, list[dict]] = {}
    for p, v in by_path.items():
        parts = p.split("/")
        for i in range(len(parts)):
            by_ending.setdefault("/".join(parts[i:]), v)
    q = np.full(len(protocol.names), FAILURE_QUALITY)
    for k, name in enumerate(protocol.names):
        candidates = by_path.get(name) or by_ending.get(name)
        if not candidates or not faces.ok[k]:
            continue
        if "quality" in candidates[0]:
            q[k] = float(candidates[0]["quality"])
            continue
        faces_rows = [r for r in candidates if r.get("quality_raw")]
        if not faces_rows:
            continue
        dets = [Detection(np.array([float(r[c]) for c in ("x1", "y1", "x2", "y2")]), np.zeros((5, 2)),
                          float(r["det_score"])) for r in faces_rows]
        q[k] = float(faces_rows[select_index(dets, *faces.sizes[k], select)]["quality_raw"])
    return q

"""The detector interface, the network input size, shared post-processing (order, size filter, cap) and the
pre-cropped retry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np

from crfiqa.service.registry import DetectorSpec
from crfiqa.service.results import Detection

#: The largest network input side when the manifest declares none (SCRFD and YuNet were trained at 640).
DEFAULT_MAX_SIZE = 640
STRIDE = 32  # every supported detector's coarsest feature stride: input sides are multiples of it


def _ceil_stride(n: float) -> int:
    """The smallest multiple of ``STRIDE`` >= n (at least one stride)."""
    return max(STRIDE, -(-round(n) // STRIDE) * STRIDE)


@dataclass(frozen=True)
class DetectorSettings:
    """Detection knobs: network input size, score and NMS thresholds, and result filters."""

    # None = sized to the image: its own size padded to a multiple of 32, downscaled only when the longer
    # side exceeds the detector's largest input (the manifest's input.size, 640). A number = always that
    # square input (letterboxed, small images upscaled), as insightface runs SCRFD.
    input_size: int | None = None
    score_threshold: float = 0.5
    nms_threshold: float = 0.4
    max_faces: int = 0  # 0 = no cap
    min_face_size: float = 0.0  # shorter box side, pixels

    def with_overrides(self, **kw) -> DetectorSettings:
        """A copy with the non-None keyword values replaced."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


class Detector(ABC):
    """Finds faces in an RGB uint8 image; subclasses implement only ``_detect``."""

    def __init__(self, settings: DetectorSettings, spec: DetectorSpec | None = None) -> None:
        self.settings = settings
        self.spec = spec or DetectorSpec()
        self.max_size = self.spec.size or DEFAULT_MAX_SIZE

    provider = "OpenCV"  # what runs the network; ONNX Runtime adapters report their execution provider

    @abstractmethod
    def _detect(self, rgb: np.ndarray, s: DetectorSettings) -> list[Detection]:
        """Raw detections (after NMS) in image coordinates."""

    def input_shape(self, height: int, width: int, s: DetectorSettings) -> tuple[float, int, int]:
        """(scale, network height, network width) for an image: the image is resized by ``scale`` and
        zero-padded at the bottom/right to the network shape."""
        if s.input_size:
            size = _ceil_stride(s.input_size)
            return size / max(height, width), size, size
        # Sized to the image: a 250 px LFW photo runs at 256x256, 6.25x fewer pixels than at 640, and
        # SCRFD's anchors (16-512 px) still cover its faces at their own scale.
        scale = min(1.0, self.max_size / max(height, width))
        return scale, _ceil_stride(height * scale), _ceil_stride(width * scale)

    def detect(self, rgb: np.ndarray, settings: DetectorSettings | None = None) -> list[Detection]:
        """Faces ordered by score (ties: larger first), filtered by size and capped at ``max_faces``."""
        s = settings or self.settings
        faces = self._detect(rgb, s)
        if not faces and max(rgb.shape[:2]) <= (s.input_size or self.max_size) // 2:
            faces = self._detect_padded(rgb, s)
        if s.min_face_size > 0:
            faces = [f for f in faces if min(f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]) >= s.min_face_size]
        faces.sort(key=lambda f: (-f.score, -f.area))
        return faces[: s.max_faces] if s.max_faces > 0 else faces

    def _detect_padded(self, rgb: np.ndarray, s: DetectorSettings) -> list[Detection]:
        """Retry for an already cropped face: a face filling the frame is missed (too big for the anchors
        at a large input size, cut by the frame at its own size), so pad by half the image size on each
        side and look again."""
        pad = max(rgb.shape[:2]) // 2
        padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)))
        shift = np.array([pad, pad], dtype=np.float32)
        h, w = rgb.shape[:2]
        out = []
        for f in self._detect(padded, s):
            bbox = f.bbox - np.tile(shift, 2)
            bbox = np.clip(bbox, 0, [w, h, w, h]).astype(np.float32)
            out.append(Detection(bbox=bbox, landmarks=f.landmarks - shift, score=f.score))
        return out


SELECT_RULES = ("center", "largest", "score")


def select_index(faces: list[Detection], width: int, height: int, rule: str) -> int | None:
    """Index of the one face an image of one subject is about: ``center`` (box centre nearest the image
    centre), ``largest`` (box area) or ``score`` (detector confidence); None when there is none."""
    if rule not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, not {rule!r}")
    if not faces:
        return None
    if rule == "center":
        keys = [(f.bbox[0] + f.bbox[2] - width) ** 2 + (f.bbox[1] + f.bbox[3] - height) ** 2 for f in faces]
        return int(np.argmin(keys))
    return int(np.argmax([f.area if rule == "largest" else f.score for f in faces]))


def select_one(faces: list[Detection], width: int, height: int, rule: str) -> list[Detection]:
    """The selected face as a one-element list ([] when there is none)."""
    k = select_index(faces, width, height, rule)
    return [] if k is None else [faces[k]]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices in descending score order."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return keep

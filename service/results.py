"""Result types: the same objects are written by the CLI, returned by the API and read by the evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crfiqa.service.errors import CrfiqaError


@dataclass(frozen=True)
class Detection:
    """One detected face in image coordinates: box, 5 landmarks (l-eye, r-eye, nose, l-mouth, r-mouth)."""

    bbox: np.ndarray  # [4] x1, y1, x2, y2
    landmarks: np.ndarray  # [5, 2]
    score: float

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return float(max(self.bbox[2] - self.bbox[0], 0) * max(self.bbox[3] - self.bbox[1], 0))

    def to_dict(self, landmarks: bool = True) -> dict:
        """JSON form: ``bbox``, ``det_score`` and (optionally) ``landmarks``."""
        out: dict = {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "det_score": round(float(self.score), 5),
        }
        if landmarks:
            out["landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks]
        return out


@dataclass(frozen=True)
class Quality:
    """A quality model's output for one face: ``raw`` as the model gives it, ``score`` mapped to [0, 100]."""

    raw: float
    score: float

    def to_dict(self) -> dict:
        """JSON form: ``{"raw", "score"}``."""
        return {"raw": round(self.raw, 6), "score": round(self.score, 3)}


@dataclass(frozen=True)
class Component:
    """One quality component (docs/components.md): a native ``value`` in ``unit`` and, where a mapping is
    defined, a 0-100 ``score`` (higher = better; None where no mapping is defined)."""

    value: float
    unit: str
    score: float | None = None

    def to_dict(self) -> dict:
        """JSON form: ``{"value", "unit", "score"}``."""
        return {"value": round(self.value, 5), "unit": self.unit,
                "score": None if self.score is None else round(self.score, 2)}


@dataclass
class FaceResult:
    """One face: its detection, (when scored) its quality and (when asked for) its quality components."""

    detection: Detection
    quality: Quality | None = None
    components: dict[str, Component] | None = None

    def to_dict(self, landmarks: bool = True) -> dict:
        """JSON form shared by ``crfiqa score`` and ``POST /v1/quality``."""
        out = self.detection.to_dict(landmarks)
        if self.quality is not None:
            out["quality"] = self.quality.to_dict()
        if self.components is not None:
            out["components"] = {name: c.to_dict() for name, c in self.components.items()}
        return out


@dataclass
class ImageResult:
    """The outcome for one input image: ``ok`` with its faces (maybe none) or ``error`` with a typed error."""

    source: str
    faces: list[FaceResult] = field(default_factory=list)
    error: CrfiqaError | None = None
    width: int = 0
    height: int = 0

    @property
    def ok(self) -> bool:
        """True when the image was processed (a decodable image without faces is ok)."""
        return self.error is None

    def to_dict(self, key: str = "path", landmarks: bool = True) -> dict:
        """JSON form; ``key`` names the source field (``path`` in the CLI, ``id``/``filename`` in the API)."""
        out: dict = {key: self.source, "status": "ok" if self.ok else "error"}
        if self.error is not None:
            out["error"] = self.error.to_dict()
        out["faces"] = [f.to_dict(landmarks) for f in self.faces]
        return out

"""Pictures for people: an input image with each face's box, landmarks, quality score and weakest component."""

from __future__ import annotations

import cv2
import numpy as np

from crfiqa.service.components import weakest
from crfiqa.service.results import ImageResult

# RGB colours by calibrated score: good / middling / poor (the model card's 20/80 percentiles bracket them).
GOOD, FAIR, POOR, NONE = (40, 200, 60), (240, 190, 30), (230, 40, 40), (200, 200, 200)


def _colour(score: float | None) -> tuple[int, int, int]:
    """Box colour for a 0-100 score (grey when not scored)."""
    if score is None:
        return NONE
    return GOOD if score >= 60 else FAIR if score >= 30 else POOR


def _label(img: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], scale: float,
           thickness: int) -> None:
    """Text on a filled box, kept inside the image."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    h, w = img.shape[:2]
    x = max(0, min(x, w - tw - 2))
    y = max(th + base + 2, min(y, h - 2))
    cv2.rectangle(img, (x, y - th - base - 2), (x + tw + 2, y), colour, cv2.FILLED)
    cv2.putText(img, text, (x + 1, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)


def annotate(rgb: np.ndarray, result: ImageResult) -> np.ndarray:
    """A copy of the RGB image with every face of ``result`` drawn: box coloured by score, 5 landmarks, the
    score above the box and the weakest component (lowest component score) below it."""
    img = np.ascontiguousarray(rgb).copy()
    side = min(img.shape[:2])
    thickness = max(1, round(side / 400))
    scale = max(0.35, side / 1000)
    for k, face in enumerate(result.faces):
        d = face.detection
        score = face.quality.score if face.quality is not None else None
        colour = _colour(score)
        x1, y1, x2, y2 = (round(float(v)) for v in d.bbox)
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
        for x, y in d.landmarks:
            cv2.circle(img, (round(float(x)), round(float(y))), max(1, thickness + 1), (0, 160, 255), cv2.FILLED)
        top = f"#{k} q {score:.0f}" if score is not None else f"#{k}"
        _label(img, top, x1, y1 - 2, colour, scale, thickness)
        worst = weakest(face.components) if face.components else None
        if worst is not None:
            name, c = worst
            text = f"{name} {c.value:.3g} {c.unit} ({c.score:.0f})"
            _label(img, text, x1, y2 + round(22 * scale) + 4, _colour(c.score), scale, thickness)
    return img

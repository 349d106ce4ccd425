"""The 0-100 calibration of a quality model from anchor sets: what users expect a score to mean.

Anchors (issue 14): sharp, frontal, high-resolution faces should average >= 70, and faces whose eyes are
10 px apart or that are heavily blurred should average <= 20. The good set is aligned crops of clean
deep-funnelled LFW training photos (eyes 40-60+ px apart in the photo, so the 112 crop is at full
detail); the bad sets are the same crops with the resolution of a 10-px inter-eye face (``resample``)
and with a Gaussian blur of sigma 3 at the crop scale. The logistic's centre and scale are chosen so that
the good set averages ``good_target`` and the worse of the two bad sets averages ``bad_target``.
"""

from __future__ import annotations

import numpy as np

from crfiqa.evaluation.degradations import TEMPLATE_EYE_PX, blur, resample
from crfiqa.service.facemodel import calibrate
from crfiqa.service.registry import Calibration

GOOD_TARGET, BAD_TARGET = 80.0, 12.0
LOW_EYE_PX, HEAVY_BLUR_SIGMA = 10.0, 3.0


def anchor_sets(crops: np.ndarray) -> dict[str, np.ndarray]:
    """{"good": the crops, "eye10px": resampled to a 10-px inter-eye face, "blur3": Gaussian sigma 3}."""
    low = np.stack([resample(c, LOW_EYE_PX / TEMPLATE_EYE_PX) for c in crops])
    blurred = np.stack([blur(c, HEAVY_BLUR_SIGMA) for c in crops])
    return {"good": crops, "eye10px": low, "blur3": blurred}


def fit_anchor_calibration(good: np.ndarray, bad: list[np.ndarray], good_target: float = GOOD_TARGET,
                           bad_target: float = BAD_TARGET) -> Calibration:
    """Centre and scale with mean score(good) = ``good_target`` and max over ``bad`` of the mean score =
    ``bad_target`` (two equations, solved by bisection on the centre with the scale fitted inside)."""
    good = np.asarray(good, np.float64)
    if not bad or np.median(good) <= max(np.median(b) for b in bad):
        raise ValueError("the good anchor faces must score above the bad ones")

    def mean_score(raw: np.ndarray, c: float, s: float) -> float:
        return float(calibrate(raw, Calibration(c, s)).mean())

    def scale_for(c: float) -> float:
        # mean score of the good set decreases with the scale when most good faces are above the centre
        lo, hi = 1e-6, 10.0 * (np.ptp(good) + 1e-6)
        for _ in range(80):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if mean_score(good, c, mid) > good_target else (lo, mid)
        return (lo * hi) ** 0.5

    def worst_bad(c: float) -> float:
        s = scale_for(c)
        return max(mean_score(np.asarray(b, np.float64), c, s) for b in bad)

    # Above the centre the mean can exceed good_target only if enough good faces are: keep it below the
    # 10th percentile of the good set; if the bad target is out of reach there, this returns that limit.
    lo = min(float(np.min(b)) for b in bad)
    hi = float(np.percentile(good, 10))
    for _ in range(60):  # a higher centre pushes the bad sets further down
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if worst_bad(mid) > bad_target else (lo, mid)
    c = 0.5 * (lo + hi)
    return Calibration(centre=float(c), scale=float(scale_for(c)))


def anchor_report(raw: dict[str, np.ndarray], calibration: Calibration) -> dict[str, float]:
    """Mean 0-100 score of each anchor set."""
    return {k: float(calibrate(v, calibration).mean()) for k, v in raw.items()}

"""The 0-100 calibration of a quality model from anchor sets: what users expect a score to mean.

Anchors (issue 14): sharp, frontal, high-resolution faces should average >= 70, and faces whose eyes are
10 px apart or that are heavily blurred should average <= 20. The good set is aligned crops of clean
deep-funnelled LFW training photos (eyes 40-60+ px apart in the photo, so the 112 crop is at full
detail); the bad sets are the same crops with the resolution of a 10-px inter-eye face (``resample``)
and with a Gaussian blur of sigma 3 at the crop scale. The logistic's centre and scale are chosen so that
the good set averages at least ``good_target`` and the worse of the two bad sets at most ``bad_target``, with
the widest logistic that does both.
"""

from __future__ import annotations

import numpy as np

from crfiqa.evaluation.degradations import TEMPLATE_EYE_PX, blur, resample
from crfiqa.service.facemodel import calibrate
from crfiqa.service.registry import Calibration

GOOD_TARGET, BAD_TARGET = 70.0, 20.0  # issue 14: sharp faces >= 70 on average, 10-px or blurred <= 20
LOW_EYE_PX, HEAVY_BLUR_SIGMA = 10.0, 3.0


def anchor_sets(crops: np.ndarray) -> dict[str, np.ndarray]:
    """{"good": the crops, "eye10px": resampled to a 10-px inter-eye face, "blur3": Gaussian sigma 3}."""
    low = np.stack([resample(c, LOW_EYE_PX / TEMPLATE_EYE_PX) for c in crops])
    blurred = np.stack([blur(c, HEAVY_BLUR_SIGMA) for c in crops])
    return {"good": crops, "eye10px": low, "blur3": blurred}


def fit_anchor_calibration(good: np.ndarray, bad: list[np.ndarray], good_target: float = GOOD_TARGET,
                           bad_target: float = BAD_TARGET) -> Calibration:
    """The widest logistic (largest scale) whose good set averages >= ``good_target`` and whose worse bad
    set averages <= ``bad_target``: both targets hold, and scores stay spread over 0-100 instead of
    becoming a pass/fail step. At that scale both targets are met with equality."""
    good = np.asarray(good, np.float64)
    bad = [np.asarray(b, np.float64) for b in bad]
    if not bad or np.median(good) <= max(np.median(b) for b in bad):
        raise ValueError("the good anchor faces must score above the bad ones")
    if not bad_target < 50.0 < good_target:  # the centre searches below bracket only targets either side of 50
        raise ValueError(f"targets must lie either side of 50 (good {good_target}, bad {bad_target})")
    every = np.concatenate([good, *bad])
    lo_c, hi_c = float(every.min()) - 1.0, float(every.max()) + 1.0

    def mean_score(raw: np.ndarray, c: float, s: float) -> float:
        return float(calibrate(raw, Calibration(c, s)).mean())

    def centre_where(f, target: float, s: float) -> float:
        """The centre at which ``f(c, s)`` (decreasing in c) equals ``target``."""
        lo, hi = lo_c, hi_c
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid, s) > target else (lo, mid)
        return 0.5 * (lo + hi)

    def window(s: float) -> tuple[float, float]:
        """(lowest centre with the bad sets <= target, highest with the good set >= target) at scale ``s``."""
        worst = lambda c, s: max(mean_score(b, c, s) for b in bad)  # noqa: E731
        return centre_where(worst, bad_target, s), centre_where(lambda c, s: mean_score(good, c, s), good_target, s)

    spread = float(np.ptp(every)) + 1e-6
    lo_s, hi_s = 1e-6 * spread, 10.0 * spread
    c_bad, c_good = window(lo_s)
    if c_bad > c_good:
        raise ValueError(f"no logistic puts the good anchors above {good_target} and the bad ones below {bad_target}")
    for _ in range(60):  # wider scales narrow the window of admissible centres until it closes
        mid = (lo_s * hi_s) ** 0.5
        b, g = window(mid)
        lo_s, hi_s = (mid, hi_s) if b <= g else (lo_s, mid)
    c_bad, c_good = window(lo_s)
    return Calibration(centre=float(0.5 * (c_bad + c_good)), scale=float(lo_s))


def anchor_report(raw: dict[str, np.ndarray], calibration: Calibration) -> dict[str, float]:
    """Mean 0-100 score of each anchor set."""
    return {k: float(calibrate(v, calibration).mean()) for k, v in raw.items()}

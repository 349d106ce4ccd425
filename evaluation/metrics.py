"""Verification error and Error-versus-Reject curves, exactly as defined in the evaluation issue.

Scores are similarities (higher = more similar). Pair quality is the lower of the two images'.
Two protocols: ``paper`` (the released CR-FIQA ERC: all pairs are rejected lowest quality first) and
``iso`` (ISO/IEC 29794-1 EDC as in the dasec reference code: a fixed threshold; only mated pairs count
in the discard fraction; pairs of equal quality are discarded together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_RATIOS = np.round(np.arange(0.0, 0.951, 0.05), 2)


def threshold_at_fmr(impostor: np.ndarray, fmr: float) -> float:
    """Sort impostor scores descending s(1) >= ... >= s(n), k = floor(fmr * n); t = s(k+1) (s(n) if k >= n).
    A comparison matches when its score is > t."""
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no impostor scores to set a threshold on")
    k = int(np.floor(fmr * s.size))
    return float(s[k] if k < s.size else s[-1])


def threshold_at_fnmr(genuine: np.ndarray, fnmr: float) -> float:
    """The threshold at which a share ``fnmr`` of the genuine scores are non-matches (<= t):
    sort ascending g(1) <= ... <= g(m), k = floor(fnmr * m); t = g(k) (below every score when k = 0)."""
    g = np.sort(np.asarray(genuine, dtype=np.float64))
    k = int(np.floor(fnmr * g.size))
    return float(g[k - 1]) if k > 0 else float(np.nextafter(g[0], -np.inf))


def fnmr(genuine: np.ndarray, threshold: float) -> float:
    """Share of genuine scores <= threshold (0 when there are none)."""
    g = np.asarray(genuine)
    return float(np.mean(g <= threshold)) if g.size else 0.0


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (NumPy renamed trapz; one spelling here)."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


@dataclass
class Curve:
    """An error-versus-reject curve: x = rejected/discarded fraction, y = FNMR of what is kept."""

    x: np.ndarray
    y: np.ndarray
    threshold: float | None  # fixed threshold, or None when recomputed per step
    auc: float

    def to_dict(self) -> dict:
        """JSON form."""
        return {"x": [round(float(v), 6) for v in self.x], "fnmr": [round(float(v), 6) for v in self.y],
                "threshold": self.threshold, "auc": self.auc}


def erc_paper(scores: np.ndarray, genuine: np.ndarray, quality: np.ndarray, fmr: float,
              threshold_mode: str = "per-step", ratios: np.ndarray = PAPER_RATIOS) -> Curve:
    """The released CR-FIQA ERC: reject the floor(r*N) lowest-quality pairs (stable, ties in input order)
    of all N pairs; FNMR of the kept genuine pairs at the FMR threshold (recomputed on the kept impostors
    per step, or fixed once on all impostors); AUC = trapezoid over the ratios."""
    scores, genuine = np.asarray(scores, np.float64), np.asarray(genuine, bool)
    order = np.argsort(np.asarray(quality, np.float64), kind="stable")
    s, g = scores[order], genuine[order]
    n = s.size
    fixed = threshold_at_fmr(s[~g], fmr) if threshold_mode == "fixed" else None
    if threshold_mode not in ("fixed", "per-step"):
        raise ValueError("threshold_mode must be per-step or fixed")
    ys = []
    for r in ratios:
        keep = slice(int(np.floor(r * n)), None)
        ks, kg = s[keep], g[keep]
        t = fixed if fixed is not None else (threshold_at_fmr(ks[~kg], fmr) if (~kg).any() else np.inf)
        ys.append(fnmr(ks[kg], t))
    y = np.array(ys)
    return Curve(np.asarray(ratios, np.float64), y, fixed, trapezoid(y, ratios))


def edc_iso(genuine_scores: np.ndarray, genuine_quality: np.ndarray, threshold: float) -> Curve:
    """ISO/IEC 29794-1 EDC over the mated comparisons: point 0 keeps all; then, for each distinct pair
    quality ascending, every pair of that quality is discarded together. ``auc`` is left to ``pauc``."""
    s = np.asarray(genuine_scores, np.float64)
    q = np.asarray(genuine_quality, np.float64)
    order = np.argsort(q, kind="stable")
    s, q = s[order], q[order]
    errors = (s <= threshold).astype(np.int64)
    m = s.size
    levels_end = np.flatnonzero(np.r_[q[1:] != q[:-1], True]) + 1  # index after each quality level
    remaining_errors = errors.sum() - np.r_[0, np.cumsum(errors)[levels_end - 1]]
    remaining = m - np.r_[0, levels_end]
    x = np.r_[0, levels_end] / m
    y = np.where(remaining > 0, remaining_errors / np.maximum(remaining, 1), 0.0)
    return Curve(x, y, float(threshold), float("nan"))


def pauc(curve: Curve, limit: float) -> float:
    """Stepwise area under the EDC from 0 to ``limit``: y(x_i) holds until x_{i+1}."""
    x, y = curve.x, curve.y
    x_next = np.r_[x[1:], np.inf]
    width = np.clip(np.minimum(x_next, limit) - x, 0, None)
    return float(np.sum(y * width))


def value_at(curve: Curve, discard: float) -> float:
    """The step EDC's FNMR at ``discard`` (the last point at or before it)."""
    i = np.searchsorted(curve.x, discard, side="right") - 1
    return float(curve.y[max(i, 0)])


def halving_discard(curve: Curve) -> float | None:
    """The smallest discard fraction at which FNMR is at most half the starting FNMR (None if never)."""
    if curve.y[0] == 0:
        return 0.0
    hits = np.flatnonzero(curve.y <= curve.y[0] / 2)
    return float(curve.x[hits[0]]) if hits.size else None


def verification_accuracy(scores: np.ndarray, genuine: np.ndarray) -> tuple[float, float]:
    """(best accuracy over all thresholds, that threshold): the recogniser's sanity number."""
    s, g = np.asarray(scores, np.float64), np.asarray(genuine, bool)
    finite = np.isfinite(s)
    cands = np.unique(s[finite])
    if cands.size == 0:
        return float(np.mean(~g)), float("inf")
    order = np.argsort(s, kind="stable")
    ss, gg = s[order], g[order]
    # accuracy(t) for t = each score: genuine above t correct, impostors at/below t correct
    gen_le = np.cumsum(gg)
    imp_le = np.cumsum(~gg)
    acc = (imp_le + (gg.sum() - gen_le)) / s.size
    best = int(np.argmax(acc))
    return float(acc[best]), float(ss[best])

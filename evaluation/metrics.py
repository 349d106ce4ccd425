"""Verification error and Error-versus-Reject curves, exactly as defined in the evaluation issue.

Scores are similarities (higher = more similar). Pair quality is the lower of the two images'.
Two protocols: ``paper`` (the released CR-FIQA ERC: all pairs are rejected lowest quality first, a tied
level straddling the cut in proportion) and
``iso`` (ISO/IEC 29794-1 EDC as in the dasec reference code: a fixed threshold; only mated pairs count
in the discard fraction; pairs of equal quality are discarded together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_RATIOS = np.round(np.arange(0.0, 0.951, 0.05), 2)


def floor_share(ratio: float, n: float) -> int:
    """floor(ratio * n) for a share given in decimals: a float product can land just below the integer it
    means (0.35 * 180 = 62.99999...), which would reject one pair too few."""
    return int(np.floor(ratio * n + 1e-9))


def levels(sorted_quality: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in an ascending array, then its length (one more entry)."""
    q = np.asarray(sorted_quality)
    return np.r_[0, np.flatnonzero(q[1:] != q[:-1]) + 1, q.size]


def level_around(bounds: np.ndarray, pos: int) -> tuple[int, int]:
    """The [start, end) of the run of equal values (``levels``' ``bounds``) that holds index ``pos``."""
    k = int(np.searchsorted(bounds, pos, side="right")) - 1
    return int(bounds[k]), int(bounds[k + 1])


def straddled_fnmr(cut: float, level: tuple[float, float], genuine: tuple[float, float, float],
                   errors: tuple[float, float, float]) -> float:
    """FNMR of the kept genuine pairs when pairs are rejected lowest quality first up to weight ``cut``, and
    the quality level straddling the cut (weights before it and after it: ``level``) is rejected in
    proportion: the expectation over every order of its tied pairs, so the order pairs are listed in (all-vs-
    all lists genuine pairs first) can neither help nor hurt a method with many equal qualities.
    ``genuine``/``errors``: the genuine weight and the false non-match weight before the level, after it
    (cumulative, at its end) and in all."""
    before, after = level
    kept_share = (after - cut) / (after - before) if after > before else 0.0
    kept = genuine[2] - genuine[1] + (genuine[1] - genuine[0]) * kept_share
    wrong = errors[2] - errors[1] + (errors[1] - errors[0]) * kept_share
    return float(wrong / kept) if kept > 0 else 0.0


def threshold_at_fmr(impostor: np.ndarray, fmr: float) -> float:
    """Sort impostor scores descending s(1) >= ... >= s(n), k = floor(fmr * n); t = s(k+1) (s(n) if k >= n).
    A comparison matches when its score is > t."""
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no impostor scores to set a threshold on")
    k = floor_share(fmr, s.size)
    return float(s[k] if k < s.size else s[-1])


def threshold_at_fnmr(genuine: np.ndarray, fnmr: float) -> float:
    """The threshold at which a share ``fnmr`` of the genuine scores are non-matches (<= t):
    sort ascending g(1) <= ... <= g(m), k = floor(fnmr * m); t = g(k) (below every score when k = 0)."""
    g = np.sort(np.asarray(genuine, dtype=np.float64))
    k = floor_share(fnmr, g.size)
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
    """The released CR-FIQA ERC: reject the floor(r*N) lowest-quality pairs of all N pairs; FNMR of the kept
    genuine pairs at the FMR threshold (fixed once on all impostors, or recomputed on the kept impostors per
    step); AUC = trapezoid over the ratios. Ties: with the fixed threshold the level straddling the cut is
    rejected in proportion (``straddled_fnmr``); per step, tied pairs go in a seeded random order (the
    threshold moves with which impostors remain), never in the order they are listed."""
    if threshold_mode not in ("fixed", "per-step"):
        raise ValueError("threshold_mode must be per-step or fixed")
    scores, genuine = np.asarray(scores, np.float64), np.asarray(genuine, bool)
    quality = np.asarray(quality, np.float64)
    n = scores.size
    if threshold_mode == "fixed":
        order = np.argsort(quality, kind="stable")
        s, g = scores[order], genuine[order]
        fixed = threshold_at_fmr(s[~g], fmr)
        cg, ce = np.r_[0, np.cumsum(g)], np.r_[0, np.cumsum(g & (s <= fixed))]
        bounds = levels(quality[order])
        ys = []
        for r in ratios:
            cut = floor_share(r, n)
            if cut >= n:
                ys.append(0.0)
                continue
            a, e = level_around(bounds, cut)
            ys.append(straddled_fnmr(cut, (a, e), (cg[a], cg[e], cg[-1]), (ce[a], ce[e], ce[-1])))
        y = np.array(ys)
        return Curve(np.asarray(ratios, np.float64), y, fixed, trapezoid(y, ratios))
    order = np.lexsort((np.random.default_rng(0).permutation(n), quality))
    s, g = scores[order], genuine[order]
    ys = []
    for r in ratios:
        keep = slice(floor_share(r, n), None)
        ks, kg = s[keep], g[keep]
        ys.append(fnmr(ks[kg], threshold_at_fmr(ks[~kg], fmr) if (~kg).any() else np.inf))
    y = np.array(ys)
    return Curve(np.asarray(ratios, np.float64), y, None, trapezoid(y, ratios))


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
    # accuracy(t) at t = each distinct score (the last of its ties: no threshold splits equal scores):
    # genuine above t correct, impostors at/below t correct; plus t below every score (all match).
    ends = levels(ss)[1:] - 1
    gen_le, imp_le = np.cumsum(gg)[ends], np.cumsum(~gg)[ends]
    acc = np.r_[gg.mean(), (imp_le + (gg.sum() - gen_le)) / s.size]
    best = int(np.argmax(acc))
    return float(acc[best]), float(np.nextafter(ss[0], -np.inf) if best == 0 else ss[ends[best - 1]])

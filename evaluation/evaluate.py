"""Error-versus-Reject evaluation of several quality sources on one protocol, with identity-bootstrap
intervals and paired differences. Pure NumPy: inputs are embeddings, qualities and pairs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from crfiqa.evaluation.metrics import (
    PAPER_RATIOS,
    Curve,
    edc_iso,
    erc_paper,
    floor_share,
    fnmr,
    halving_discard,
    level_around,
    levels,
    pauc,
    straddled_fnmr,
    threshold_at_fmr,
    threshold_at_fnmr,
    trapezoid,
    value_at,
    verification_accuracy,
)

log = logging.getLogger("crfiqa.evaluate")
FEW_ERRORS = 30  # below this many false non-matches, rankings of methods are not meaningful


@dataclass
class Settings:
    """How to evaluate."""

    fmrs: tuple[float, ...] = (1e-3,)
    protocols: tuple[str, ...] = ("iso",)
    threshold_mode: str = "per-step"
    start_fnmr: float | None = None
    pauc_limits: tuple[float, ...] = (0.2, 0.3)
    bootstrap: int = 1000
    seed: int = 0
    exclude_failures: bool = False


@dataclass
class Pairs:
    """Comparison scores with their pair qualities per method."""

    scores: np.ndarray  # [P] cosine; -inf where an image failed
    genuine: np.ndarray  # [P] bool
    cluster: np.ndarray  # [P, 2] identity clusters of the two images (for the bootstrap)
    quality: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [P] min of the two qualities


def pair_scores(embeddings: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarity of L2-normalised embeddings; -inf (a non-match) where either image failed."""
    norm = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    s = np.einsum("ij,ij->i", norm[left], norm[right])
    return np.where(np.isfinite(s), s, -np.inf)


def build_pairs(embeddings: np.ndarray, qualities: dict[str, np.ndarray], left: np.ndarray, right: np.ndarray,
                genuine: np.ndarray, cluster: np.ndarray, ok: np.ndarray, exclude_failures: bool) -> Pairs:
    """Scores and per-method pair qualities (min of the two images'), failures kept or dropped."""
    keep = (ok[left] & ok[right]) if exclude_failures else np.ones(left.size, bool)
    left, right = left[keep], right[keep]
    pq = {m: np.minimum(q[left], q[right]) for m, q in qualities.items()}
    return Pairs(pair_scores(embeddings, left, right), genuine[keep], cluster[keep], pq)


def _iso_weighted(scores: np.ndarray, quality: np.ndarray, threshold: float, w: np.ndarray, limit: float) -> float:
    """EDC pAUC of the mated pairs with bootstrap multiplicities ``w`` (equal qualities discarded together)."""
    order = np.argsort(quality, kind="stable")
    q, err, ww = quality[order], (scores[order] <= threshold) * w[order], w[order]
    ends = np.flatnonzero(np.r_[q[1:] != q[:-1], True])
    cw, ce = np.cumsum(ww)[ends], np.cumsum(err)[ends]
    total, total_err = ww.sum(), err.sum()
    x = np.r_[0.0, cw] / total
    remaining = total - np.r_[0.0, cw]
    y = np.where(remaining > 0, (total_err - np.r_[0.0, ce]) / np.maximum(remaining, 1e-12), 0.0)
    return pauc(Curve(x, y, threshold, 0.0), limit)


BLOCK = 2048  # pairs per block of the cumulative-count table of the paper-protocol bootstrap


def _weight_before(cum: np.ndarray, head: np.ndarray, pos: int) -> float:
    """The weight of the quality-ordered pairs before ``pos``: the table's, up to ``pos``'s block, plus
    ``head``, the weights of that block's pairs before ``pos``."""
    return float(cum[min(pos // BLOCK, cum.size - 1)] + head.sum())


def pair_weights(d: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """A bootstrap draw's weight of each pair: the mean multiplicity of its two images' identities.

    A genuine pair weighs its identity's multiplicity. An impostor pair is credited half to each side: the
    linear part of the two-way weight d_left x d_right, so the block table below stays one matrix product,
    and, unlike crediting the left identity, it does not depend on which image a protocol lists first (all-
    vs-all lists the earlier identity first, so the first identities carried nearly all impostors)."""
    return 0.5 * (d[clusters[..., 0]] + d[clusters[..., 1]])


def paper_fixed_bootstrap(scores: np.ndarray, genuine: np.ndarray, quality: np.ndarray, threshold: float,
                          cluster_index: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Paper-protocol AUCs (fixed threshold) for each bootstrap draw (rows of ``draws``: multiplicity of
    each identity cluster; a pair's weight is ``pair_weights``; ``cluster_index`` [P, 2]).

    With ~1.2 M all-vs-all pairs, weighting every pair per draw is too slow, so the cumulative weight of
    the quality-ordered pairs is read from a table of per-block cluster counts (one matrix product for all
    draws) and refined inside the one block where each rejection cut falls. The quality level straddling a
    cut is rejected in proportion, as ``erc_paper`` does (so a pair drawn k times is k tied copies)."""
    order = np.argsort(quality, kind="stable")
    cl = cluster_index[order]
    bounds = levels(quality[order])
    gpos = np.flatnonzero(genuine[order])
    gcl, gerr = cl[gpos], (scores[order][gpos] <= threshold).astype(np.float64)
    n, n_clusters = len(cl), draws.shape[1]
    blocks = -(-n // BLOCK)
    counts = np.zeros((blocks + 1, n_clusters))
    for b in range(blocks):
        # pair_weights in table form: each image's identity counts half
        counts[b + 1] = counts[b] + 0.5 * np.bincount(cl[b * BLOCK:(b + 1) * BLOCK].ravel(), minlength=n_clusters)
    cum = counts @ draws.T  # [blocks + 1, draws]: weight of the pairs before each block
    aucs = np.empty(len(draws))
    for j, d in enumerate(draws):
        wg = pair_weights(d, gcl)
        cg, ce = np.r_[0.0, np.cumsum(wg)], np.r_[0.0, np.cumsum(wg * gerr)]
        ys = []
        for r in PAPER_RATIOS:
            target = floor_share(r, cum[-1, j])
            b = min(int(np.searchsorted(cum[:, j], target, side="right")) - 1, blocks - 1)
            within = cum[b, j] + np.cumsum(pair_weights(d, cl[b * BLOCK:(b + 1) * BLOCK]))
            cut = min(b * BLOCK + int(np.searchsorted(within, target, side="right")), n)  # first pair not all gone
            if cut >= n:
                ys.append(0.0)
                continue
            a, e = level_around(bounds, cut)
            ga, ge = np.searchsorted(gpos, a), np.searchsorted(gpos, e)  # genuine pairs before a and e
            wa, we = (_weight_before(cum[:, j], pair_weights(d, cl[(p // BLOCK) * BLOCK:p]), p) for p in (a, e))
            ys.append(straddled_fnmr(target, (wa, we), (cg[ga], cg[ge], cg[-1]), (ce[ga], ce[ge], ce[-1])))
        aucs[j] = trapezoid(np.array(ys), PAPER_RATIOS)
    return aucs


def evaluate(pairs: Pairs, settings: Settings) -> dict:
    """Curves, AUCs and (for fixed thresholds) bootstrap intervals and paired differences per FMR."""
    s, g = pairs.scores, pairs.genuine
    imp = s[~g]
    methods = list(pairs.quality)
    out: dict = {"recognition": _recognition(pairs, settings), "results": {}}
    clusters = np.unique(pairs.cluster)
    rng = np.random.default_rng(settings.seed)
    # One set of resamples, shared by every method: the paired bootstrap.
    draws = [np.bincount(np.searchsorted(clusters, rng.choice(clusters, clusters.size)), minlength=clusters.size)
             for _ in range(settings.bootstrap)]
    cluster_index = np.searchsorted(clusters, pairs.cluster)
    for fmr in settings.fmrs:
        key = f"{fmr:g}"
        n_imp = int((~g).sum())
        res: dict = {"fmr": fmr, "impostors": n_imp}
        if fmr * n_imp < 10:
            res["warning"] = (f"FMR {fmr:g} on {n_imp} impostor comparisons: fewer than 10 impostors above the "
                              "threshold; not statistically meaningful (use the all-vs-all protocol)")
            log.warning(res["warning"])
        t = threshold_at_fnmr(s[g], settings.start_fnmr) if settings.start_fnmr else threshold_at_fmr(imp, fmr)
        res["threshold"] = t
        res["fnmr_at_0"] = fnmr(s[g], t)
        res["false_non_matches_at_0"] = int((s[g] <= t).sum())
        res["genuine"] = int(g.sum())
        if "iso" in settings.protocols:
            res["iso"] = _iso(pairs, methods, t, settings, draws, cluster_index)
        if "paper" in settings.protocols:
            res["paper"] = _paper(pairs, methods, fmr, settings, draws, cluster_index)
        out["results"][key] = res
    return out


def _interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _differences(boot: dict[str, np.ndarray], point: dict[str, float]) -> dict:
    """Paired bootstrap of A - B for every ordered pair of methods; 'better' when the interval is below 0."""
    out = {}
    for a in boot:
        for b in boot:
            if a == b:
                continue
            diff = boot[a] - boot[b]
            lo, hi = _interval(diff)
            out[f"{a} - {b}"] = {"diff": point[a] - point[b], "ci95": [lo, hi],
                                 "a_better": hi < 0, "a_worse": lo > 0}
    return out


def _iso(pairs: Pairs, methods: list[str], t: float, settings: Settings, draws, cluster_index) -> dict:
    g = pairs.genuine
    sg, cg = pairs.scores[g], cluster_index[g, 0]  # a genuine pair's two images share one identity
    out: dict = {"methods": {}, "differences": {}}
    for limit in settings.pauc_limits:
        boot: dict[str, np.ndarray] = {}
        point: dict[str, float] = {}
        for m in methods:
            qg = pairs.quality[m][g]
            curve = edc_iso(sg, qg, t)
            entry = out["methods"].setdefault(m, {"curve": curve.to_dict(), "fnmr_at_5pct": value_at(curve, 0.05),
                                                  "fnmr_at_10pct": value_at(curve, 0.10),
                                                  "halving_discard": halving_discard(curve), "pauc": {}})
            point[m] = pauc(curve, limit)
            boot[m] = np.array([_iso_weighted(sg, qg, t, d[cg].astype(np.float64), limit) for d in draws]) \
                if draws else np.array([point[m]])
            entry["pauc"][f"{limit:g}"] = {"value": point[m], "ci95": _interval(boot[m])}
        out["differences"][f"{limit:g}"] = _differences(boot, point)
    return out


def _paper(pairs: Pairs, methods: list[str], fmr: float, settings: Settings, draws, cluster_index) -> dict:
    out: dict = {"threshold_mode": settings.threshold_mode, "methods": {}}
    boot: dict[str, np.ndarray] = {}
    point: dict[str, float] = {}
    for m in methods:
        curve = erc_paper(pairs.scores, pairs.genuine, pairs.quality[m], fmr, settings.threshold_mode)
        out["methods"][m] = {"curve": curve.to_dict(), "auc": curve.auc}
        point[m] = curve.auc
        if settings.threshold_mode == "fixed" and len(draws):
            boot[m] = paper_fixed_bootstrap(pairs.scores, pairs.genuine, pairs.quality[m], curve.threshold,
                                            cluster_index, np.asarray(draws, dtype=np.float64))
            out["methods"][m]["ci95"] = _interval(boot[m])
    if boot:
        out["differences"] = _differences(boot, point)
    return out


def _recognition(pairs: Pairs, settings: Settings) -> dict:
    """The recognition model's own numbers on the protocol: a bad value flags an alignment/colour bug."""
    acc, thr = verification_accuracy(pairs.scores, pairs.genuine)
    imp = pairs.scores[~pairs.genuine]
    tar = {f"{f:g}": 1.0 - fnmr(pairs.scores[pairs.genuine], threshold_at_fmr(imp, f)) for f in settings.fmrs}
    return {"accuracy": acc, "accuracy_threshold": thr, "tar_at_fmr": tar,
            "pairs": int(pairs.scores.size), "genuine": int(pairs.genuine.sum()),
            "impostor": int((~pairs.genuine).sum())}


def threshold_guidance(scores: np.ndarray, left: np.ndarray, right: np.ndarray, genuine: np.ndarray,
                       image_scores: np.ndarray, fmr: float, thresholds=range(10, 100, 10)) -> list[dict]:
    """For each 0-100 score threshold T: the share of images scoring below T (rejected; failures count as
    rejected) and the FNMR at ``fmr`` of the genuine comparisons whose two images are both kept, with the
    comparison threshold fixed on all impostors."""
    t = threshold_at_fmr(scores[~genuine], fmr)
    rows = []
    for level in thresholds:
        kept_img = image_scores >= level
        kept = genuine & kept_img[left] & kept_img[right]
        rows.append({"score_threshold": level, "images_rejected": float(1 - kept_img.mean()),
                     "genuine_kept": int(kept.sum()), "fnmr": fnmr(scores[kept], t)})
    return rows

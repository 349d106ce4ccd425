"""Quality filters over ``scores.parquet``: keep images by a minimum score or drop the lowest fraction, and
count what every identity keeps, so a filter never silently erases people.

An image's score is its first face's (the detector orders faces by score; ``--select`` picks the subject);
images without a face or with an error are never kept and are counted apart."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class FilterResult:
    """What a filter kept and dropped, image by image and by reason."""

    rule: str  # "min_score >= S" / "drop_fraction F"
    threshold: float  # min_score, or the lowest score a drop fraction kept
    paths: list[str]  # every image, item order
    scores: list[float | None]
    identities: list[str] | None
    kept: list[bool]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> images: low_score, no_face, error

    @property
    def n_kept(self) -> int:
        """Images kept."""
        return sum(self.kept)

    def per_identity(self) -> list[tuple[str, int, int]]:
        """(identity, images, kept) for every identity, the ones losing the most first."""
        counts: dict[str, list[int]] = {}
        for ident, keep in zip(self.identities or [], self.kept):
            c = counts.setdefault(ident, [0, 0])
            c[0] += 1
            c[1] += keep
        return sorted(((k, n, kept) for k, (n, kept) in counts.items()), key=lambda r: (r[2] / r[1], r[0]))


def image_scores(scores: pa.Table) -> tuple[list[str], list[float | None], list[str], list[str] | None]:
    """(paths, first-face scores or None, status, identities or None), one per image in item order."""
    first = scores.filter(pc.or_kleene(pc.is_null(scores["face"]), pc.equal(scores["face"], 0)))
    identities = first["identity"].to_pylist() if "identity" in first.column_names else None
    return (first["path"].to_pylist(), first["quality_score"].to_pylist(), first["status"].to_pylist(),
            identities)


def apply_filter(scores: pa.Table, min_score: float | None = None,
                 drop_fraction: float | None = None) -> FilterResult:
    """Keep images scoring >= ``min_score``, or drop the ``drop_fraction`` lowest-scoring scored images
    (exactly floor(F x scored) of them; ties broken by item order)."""
    paths, values, status, identities = image_scores(scores)
    valid = {i: v for i, v in enumerate(values) if v is not None}
    scored = list(valid)
    if min_score is not None:
        keep = {i for i in scored if valid[i] >= min_score}
        rule = f"quality_score >= {min_score:g}"
    elif drop_fraction is not None:
        n_drop = math.floor(drop_fraction * len(scored))
        order = sorted(scored, key=lambda i: (valid[i], i))
        keep = set(order[n_drop:])
        rule = f"drop the lowest {drop_fraction:.1%} ({n_drop} images)"
    else:
        raise ValueError("a filter needs min_score or drop_fraction")
    kept = [i in keep for i in range(len(paths))]
    kept_scores = [valid[i] for i in keep]
    # The line the report draws: the rule's own threshold, or the lowest score a fraction kept.
    threshold: float = min_score if min_score is not None else min(kept_scores) if kept_scores else math.nan
    dropped = {"low_score": len(scored) - len(keep),
               "no_face": sum(1 for i, v in enumerate(values) if v is None and status[i] == "ok"),
               "error": sum(1 for s in status if s != "ok")}
    return FilterResult(rule, threshold, paths, values, identities, kept, dropped)


def write_filter(dst: Path, result: FilterResult) -> list[Path]:
    """``DST/kept.txt`` (kept paths, item order) and, with identities, ``DST/identities.csv``."""
    written = [dst / "kept.txt"]
    _write_text(written[0], "".join(f"{p}\n" for p, k in zip(result.paths, result.kept) if k))
    if result.identities is not None:
        path = dst / "identities.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["identity", "images", "kept", "dropped", "kept_fraction"])
            for ident, n, kept in result.per_identity():
                w.writerow([ident, n, kept, n - kept, f"{kept / n:.4f}"])
        os.replace(tmp, path)
        written.append(path)
    return written


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""``DST/report.html``: one self-contained page (inline PNG histogram, inline JPEG thumbnails, no script, a
Content-Security-Policy that forbids any network fetch) that people look at before trusting a filter."""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from crfiqa.curation.filters import FilterResult

DECILES = 10


@dataclass
class ReportData:
    """Everything the page shows."""

    title: str
    scores: pa.Table
    facts: dict[str, str]  # summary lines: source, models, time...
    thumbnails: list[list[tuple[str, int, float, bytes]]] = field(default_factory=list)  # decile -> faces
    edges: list[float] = field(default_factory=list)  # DECILES + 1 score edges
    filter: FilterResult | None = None
    stages: dict[str, float] = field(default_factory=dict)  # stage -> summed seconds


def decile_faces(scores: pa.Table, per_decile: int) -> tuple[list[float], list[list[tuple[str, int, float]]]]:
    """Decile edges of the face scores and, per decile, up to ``per_decile`` faces spread evenly over its ranks."""
    q = scores["quality_score"].to_numpy(zero_copy_only=False)
    ok = np.flatnonzero(~np.isnan(q.astype(np.float64)))
    if not len(ok):
        return [], [[] for _ in range(DECILES)]
    values = q[ok].astype(np.float64)
    order = ok[np.argsort(values, kind="stable")]
    edges = np.quantile(values, np.linspace(0, 1, DECILES + 1)).tolist()
    paths, faces = scores["path"].to_pylist(), scores["face"].to_pylist()
    groups = []
    for part in np.array_split(order, DECILES):  # equal-count deciles by rank
        picks = part[np.unique(np.linspace(0, len(part) - 1, min(per_decile, len(part))).round().astype(int))] \
            if len(part) else []
        groups.append([(paths[i], int(faces[i]), float(q[i])) for i in picks])
    return edges, groups


def histogram_png(values: np.ndarray, threshold: float | None) -> bytes:
    """The score histogram as PNG bytes (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ax.hist(values, bins=50, range=(0, 100), color="#3b6ea5")
    if threshold is not None and not math.isnan(threshold):
        ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:.1f}")
        ax.legend()
    ax.set_xlabel("quality score (0-100)")
    ax.set_ylabel("faces")
    ax.set_title(f"{len(values)} scored faces")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _table(header: list[str] | None, rows: list[list], cls: str = "") -> str:
    """An HTML table (``header`` None: a key-value table whose first column is the key)."""
    head = "" if header is None else \
        "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


_STYLE = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1150px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#eee}.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;font-size:11px}
figure img{width:96px;height:96px;display:block}.decile h3{margin:14px 0 4px;font-size:15px}
section{margin-bottom:28px}
"""


def render(data: ReportData) -> str:
    """The report page as a string."""
    s = data.scores
    status = s["status"].to_pylist()
    face = s["face"].to_pylist()
    # One (status, code) per image: its face-0 row, or its one row with empty face fields.
    per_image = [(st, code) for st, code, f in zip(status, s["error_code"].to_pylist(), face) if not f]
    q = s["quality_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    values = q[~np.isnan(q)]
    n_images = len(per_image)
    no_face = sum(1 for st, f in zip(status, face) if st == "ok" and f is None)
    facts = {"images": str(n_images), "faces": str(int(sum(f is not None for f in face))),
             "scored faces": str(len(values)), "images without a face": str(no_face),
             "images with an error": str(sum(1 for st, _ in per_image if st != "ok")), **data.facts}
    parts = [f"<h1>{html.escape(data.title)}</h1>",
             '<section id="summary"><h2>Summary</h2>' + _table(None, [[k, v] for k, v in facts.items()], "facts") +
             "</section>"]
    threshold = data.filter.threshold if data.filter else None
    if len(values):
        img = _data_uri("image/png", histogram_png(values, threshold))
        parts.append(f'<section id="histogram"><h2>Score histogram</h2><img alt="histogram of quality scores" '
                     f'src="{img}"></section>')
    else:
        parts.append('<section id="histogram"><h2>Score histogram</h2><p>No face was scored.</p></section>')
    deciles = ['<section id="deciles"><h2>Faces by score decile</h2>'
               "<p>Equal-count deciles of the face scores, lowest first; faces spread evenly over each.</p>"]
    for k, faces in enumerate(data.thumbnails):
        lo, hi = (data.edges[k], data.edges[k + 1]) if len(data.edges) > k + 1 else (math.nan, math.nan)
        figs = "".join(f'<figure><img alt="{html.escape(p)} face {f}" src="{_data_uri("image/jpeg", jpg)}">'
                       f"<figcaption>{sc:.1f}</figcaption></figure>" for p, f, sc, jpg in faces)
        deciles.append(f'<div class="decile" data-decile="{k + 1}"><h3>Decile {k + 1}: scores {lo:.1f} to '
                       f'{hi:.1f}</h3><div class="grid">{figs}</div></div>')
    parts.append("".join(deciles) + "</section>")
    by_status = Counter(st for st, _ in per_image)
    by_code = Counter(code for st, code in per_image if st != "ok")
    parts.append('<section id="status"><h2>Status and error codes</h2>' +
                 _table(["status", "images"], [list(r) for r in sorted(by_status.items())], "status") +
                 _table(["error code", "images"], [list(r) for r in sorted(by_code.items(), key=lambda r: (-r[1], r[0]))],
                        "codes") +
                 "</section>")
    parts.append(_filter_section(data.filter))
    if data.stages:
        rows = [[k.removeprefix("t_"), f"{v:.2f}", f"{1000 * v / max(n_images, 1):.2f}"]
                for k, v in data.stages.items() if k.startswith("t_") or k == "driver"]
        parts.append('<section id="stages"><h2>Time by stage</h2><p>Summed over workers.</p>' +
                     _table(["stage", "seconds", "ms / image"], rows) + "</section>")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{csp}"><title>{html.escape(data.title)}</title><style>{_STYLE}</style></head><body>'
            + "\n".join(parts) + "</body></html>\n")


def _filter_section(result: FilterResult | None) -> str:
    if result is None:
        return ('<section id="filter"><h2>Filter</h2><p>No filter was applied (use --min-score or '
                "--drop-fraction).</p></section>")
    rows = [["rule", result.rule], ["threshold", f"{result.threshold:.3f}"],
            ["images kept", result.n_kept], *[[f"dropped: {k}", v] for k, v in result.dropped.items()]]
    out = '<section id="filter"><h2>Filter</h2>' + _table(None, rows, "filter")
    if result.identities is not None:
        ids = result.per_identity()
        erased = [r for r in ids if r[2] == 0]
        out += (f"<p>{len(ids)} identities; {len(erased)} keep no image.</p><h3>Identities that lose the most</h3>"
                + _table(["identity", "images", "kept", "kept %"],
                         [[i, n, k, f"{100 * k / n:.0f}"] for i, n, k in ids[:25]], "identities"))
    return out + "</section>"

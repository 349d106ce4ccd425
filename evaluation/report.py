"""Write an evaluation: ``report.json``, ``summary.md`` and one ERC/EDC figure per FMR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_report(out: Path, report: dict) -> None:
    """All three outputs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_jsonable))
    (out / "summary.md").write_text(summary_markdown(report))
    for key, res in report["results"].items():
        plot(res, out / f"erc_fmr{key}.png", report["settings"]["protocols"][0], key)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v).__name__)


def _ci(entry: dict, scale: float = 1.0) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['value'] * scale:.2f} [{lo * scale:.2f}, {hi * scale:.2f}]"


def summary_markdown(report: dict) -> str:
    """AUC tables by method and FMR with intervals, and the 'significantly better' matrices."""
    rec, counts = report["recognition"], report["counts"]
    lines = [f"# Evaluation: {report['settings']['protocol_name']}", "",
             f"Recognition model `{report['settings']['recognition']}`: verification accuracy "
             f"{rec['accuracy']:.4f}; TAR@FMR " + ", ".join(f"{k}: {v:.4f}" for k, v in rec["tar_at_fmr"].items()) + ".",
             f"Images {counts['images']} (failures to assess: {counts['failures']}), pairs {rec['pairs']} "
             f"(genuine {rec['genuine']}, impostor {rec['impostor']}), excluded pairs {counts['excluded_pairs']}.", ""]
    for key, res in report["results"].items():
        lines += [f"## FMR {key}", "", f"Threshold {res['threshold']:.4f}; FNMR at 0 % rejection "
                  f"{res['fnmr_at_0']:.4f} ({res['false_non_matches_at_0']} false non-matches of {res['genuine']})."]
        if res["false_non_matches_at_0"] < 30:
            lines.append(f"**Only {res['false_non_matches_at_0']} errors: differences between methods here are "
                         "not meaningful.**")
        if "warning" in res:
            lines.append(f"**Warning:** {res['warning']}")
        lines.append("")
        if "iso" in res:
            limits = list(next(iter(res["iso"]["methods"].values()))["pauc"])
            lines += ["ISO/IEC 29794-1 EDC (lower is better; pAUC x1e3 with 95 % identity-bootstrap intervals):", "",
                      "| method | " + " | ".join(f"pAUC@{lim}" for lim in limits) + " | FNMR@5% | FNMR@10% | halving discard |",
                      "|---|" + "---|" * (len(limits) + 3)]
            for m, e in res["iso"]["methods"].items():
                half = e["halving_discard"]
                lines.append(f"| {m} | " + " | ".join(_ci(e["pauc"][lim], 1e3) for lim in limits) +
                             f" | {e['fnmr_at_5pct']:.4f} | {e['fnmr_at_10pct']:.4f} | "
                             f"{'never' if half is None else f'{half:.3f}'} |")
            for lim in limits:
                lines += ["", f"Significantly better (row beats column; paired bootstrap of pAUC@{lim} excludes 0):", ""]
                lines += _matrix(list(res["iso"]["methods"]), res["iso"]["differences"][lim])
            lines.append("")
        if "paper" in res:
            p = res["paper"]
            lines += [f"Paper ERC (threshold {p['threshold_mode']}; AUC of FNMR over reject ratios 0-0.95, lower is better):",
                      "", "| method | AUC |", "|---|---|"]
            for m, e in p["methods"].items():
                ci = f" [{e['ci95'][0]:.4f}, {e['ci95'][1]:.4f}]" if "ci95" in e else ""
                lines.append(f"| {m} | {e['auc']:.4f}{ci} |")
            if "differences" in p:
                lines += ["", "Significantly better (paper AUC, paired bootstrap):", ""]
                lines += _matrix(list(p["methods"]), p["differences"])
            lines.append("")
    for key, rows in report.get("guidance", {}).items():
        lines += [f"## Threshold guidance: `{report['guidance_method']}` 0-100 score, FMR {key}", "",
                  "Images scoring below the threshold are rejected (failures to assess count as rejected); FNMR "
                  "of the genuine comparisons whose two images are kept, at the threshold fixed on all impostors.",
                  "", "| score threshold | images rejected | genuine pairs kept | FNMR |", "|---|---|---|---|"]
        lines += [f"| {r['score_threshold']} | {r['images_rejected']:.1%} | {r['genuine_kept']} | {r['fnmr']:.4f} |"
                  for r in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


def _matrix(methods: list[str], diffs: dict) -> list[str]:
    rows = ["| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for a in methods:
        cells = []
        for b in methods:
            if a == b:
                cells.append("·")
                continue
            d = diffs[f"{a} - {b}"]
            cells.append("**better**" if d["a_better"] else "worse" if d["a_worse"] else "=")
        rows.append(f"| {a} | " + " | ".join(cells) + " |")
    return rows


def plot(res: dict, path: Path, protocol: str, key: str) -> None:
    """One curve per method (AUC in the legend) and the PERFECT line max(FNMR0 - x, 0), dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=80)
    block = res[protocol] if protocol in res else res[next(p for p in ("iso", "paper") if p in res)]
    xmax = 0.4 if protocol == "iso" else 0.95
    top = res["fnmr_at_0"]
    for m, e in block["methods"].items():
        c = e["curve"]
        top = max([top] + [y for x, y in zip(c["x"], c["fnmr"]) if x <= xmax])
        if protocol == "iso":
            lim = next(iter(e["pauc"]))
            ax.step(c["x"], c["fnmr"], where="post", label=f"{m} (pAUC@{lim} {e['pauc'][lim]['value'] * 1e3:.2f}e-3)")
        else:
            ax.plot(c["x"], c["fnmr"], marker=".", label=f"{m} (AUC {e['auc']:.4f})")
    x = np.linspace(0, 1 if protocol == "iso" else 0.95, 200)
    ax.plot(x, np.maximum(res["fnmr_at_0"] - x, 0), "k--", lw=1, label="PERFECT")
    ax.set_xlabel("fraction of genuine comparisons discarded" if protocol == "iso" else "ratio of pairs rejected")
    ax.set_ylabel(f"FNMR at FMR {key}")
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, top * 1.15 + 1e-6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{'EDC (ISO/IEC 29794-1)' if protocol == 'iso' else 'ERC (paper protocol)'}, FMR {key}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

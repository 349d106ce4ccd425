"""The identity threshold of ``crfiqa best``: cosine similarity of embeddings on LFW dev pairs, FMR/FNMR.

    python benchmarks/bestshot_threshold.py --models-dir ../shared/models

Embeds the images of ``lfw/dev_pairs.txt`` (500 genuine + 500 impostor pairs; the face nearest the centre)
with each embedder through the same path ``crfiqa best`` uses (Pipeline.prepare, then the recognition
adapter), and prints, per candidate threshold, the false match rate on the 500 impostor pairs and on every
cross-identity pair of those images (finer FMR), and the false non-match rate on the 500 genuine pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from crfiqa.evaluation.protocols import lfw_pairs
from crfiqa.service.bestshot import DEFAULT_THRESHOLDS, create_embedder
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def embed_all(pipe: Pipeline, embedder, sources: list[Path]) -> np.ndarray:
    """Unit embeddings [N, D] of the centre face of each image (NaN rows where no face was found)."""
    crops, found = [], []
    for _, prepared in pipe.run(sources, Options(select="center"), score=False):
        found.append(len(prepared.crops) == 1)
        if found[-1]:
            crops.append(prepared.crops[0])
    emb = embedder.embed(np.stack(crops))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = np.full((len(sources), emb.shape[1]), np.nan, np.float32)
    out[np.array(found)] = emb
    return out


def rates(sim: np.ndarray, genuine: np.ndarray, cross: np.ndarray, thresholds: list[float]) -> list[dict]:
    """FMR (pairs, all cross-identity pairs) and FNMR at each threshold (a match is sim >= threshold)."""
    return [{"threshold": t, "fmr_pairs": float((sim[~genuine] >= t).mean()),
             "fmr_all": float((cross >= t).mean()), "fnmr": float((sim[genuine] < t).mean())}
            for t in thresholds]


def main(argv: list[str] | None = None) -> dict:
    """Measure every embedder; print one table each (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=SHARED / "models")
    ap.add_argument("--embedders", default="w600k_mbf,quality")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    proto = lfw_pairs(SHARED / "data" / "lfw" / "dev_pairs.txt", SHARED / "data" / "lfw" / "images")
    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=("CPUExecutionProvider",)))
    ids = np.array(proto.identities)
    out: dict = {}
    for name in args.embedders.split(","):
        embedder, resolved = create_embedder(pipe, name)
        emb = embed_all(pipe, embedder, proto.sources)
        ok = ~np.isnan(emb[:, 0])
        keep = ok[proto.left] & ok[proto.right]
        sim = np.einsum("ij,ij->i", emb[proto.left[keep]], emb[proto.right[keep]])
        genuine = proto.genuine[keep]
        e, i = emb[ok], ids[ok]
        full = e @ e.T
        upper = np.triu(np.ones_like(full, dtype=bool), 1)
        cross = full[upper & (i[:, None] != i[None, :])]
        default = DEFAULT_THRESHOLDS.get(resolved)
        grid = sorted({round(t, 2) for t in np.arange(0.15, 0.60, 0.05)} | ({default} if default else set()))
        table = rates(sim, genuine, cross, grid)
        out[resolved] = {"images": int(ok.sum()), "pairs": int(keep.sum()), "cross_pairs": int(cross.size),
                         "default": default, "rates": table}
        print(f"\n## {resolved}: {ok.sum()} images with a face, {keep.sum()} pairs, {cross.size} cross-identity "
              f"pairs; default threshold {default}")
        print("| threshold | FMR (500 impostor pairs) | FMR (all cross-identity pairs) | FNMR (genuine pairs) |")
        print("|---:|---:|---:|---:|")
        for r in table:
            mark = " (default)" if r["threshold"] == default else ""
            print(f"| {r['threshold']:.2f}{mark} | {r['fmr_pairs']:.4f} | {r['fmr_all']:.5f} | {r['fnmr']:.3f} |")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

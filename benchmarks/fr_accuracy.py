"""Verification accuracy of the recognition models on the 1,000 LFW dev pairs with the pipeline's
alignment (>= 99 % for w600k_mbf and >= 98.5 % for SFace expected; lower means a preprocessing bug),
and embedding throughput at batch 1 and 32. Prints a table.

    python benchmarks/fr_accuracy.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from crfiqa.evaluation.evaluate import pair_scores
from crfiqa.evaluation.metrics import threshold_at_fmr, verification_accuracy
from crfiqa.evaluation.protocols import lfw_pairs
from crfiqa.evaluation.sources import embed, find_faces, recognition_model
from crfiqa.service.pipeline import Pipeline, PipelineSettings

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    """Measure and print."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, default=REPO.parent / "shared" / "data" / "lfw")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--models", default="w600k_mbf,sface_2021dec")
    args = ap.parse_args(argv)
    proto = lfw_pairs(args.lfw / "dev_pairs.txt", args.lfw / "images")
    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=("CPUExecutionProvider",)))
    faces = find_faces(proto, pipe, "center")
    print(f"\nLFW dev pairs: {proto.left.size} pairs, {len(proto.names)} images, {faces.failures} without a face")
    print(f"{'model':<16}{'accuracy':>10}{'TAR@FMR1e-2':>13}{'faces/s bs1':>13}{'faces/s bs32':>14}")
    crops = faces.crops[faces.ok][:256]
    for name in args.models.split(","):
        model = recognition_model(name, pipe)
        emb = embed(faces, model, False, None, "")
        s = pair_scores(emb, proto.left, proto.right)
        acc, _ = verification_accuracy(s, proto.genuine)
        tar = np.mean(s[proto.genuine] > threshold_at_fmr(s[~proto.genuine], 1e-2))
        rates = []
        for bs in (1, 32):
            model.embed(crops[:bs])
            t = time.perf_counter()
            for i in range(0, len(crops), bs):
                model.embed(crops[i:i + bs])
            rates.append(len(crops) / (time.perf_counter() - t))
        print(f"{name:<16}{acc:>10.4f}{tar:>13.4f}{rates[0]:>13.1f}{rates[1]:>14.1f}")


if __name__ == "__main__":
    main()

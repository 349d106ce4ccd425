"""Ablations of the v2 recipe (``mode: closed_form``) from one finished run's feature shards.

Every variant's features are a subset of the shipped head's columns ([e/|e|, log|e|, then the mean and spread
of each tapped map's channels]) and of its copies (copy 0 = the clean faces), so each one is refitted by the
same ridge regression without another pass over the training faces, then judged on all-vs-all dev sets
(paper ERC AUC, fixed threshold, identity bootstrap) beside the embedding norm and LightQNet.

    python scripts/ablate_closed_form.py runs/crfiqa_mbf_v2 --set ofiq=runs/lfw_dev_ofiq --set celeba=runs/celeba_split/dev
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from crfiqa.evaluation import evaluate as ev
from crfiqa.evaluation import protocols, sources
from crfiqa.service.pipeline import Pipeline, PipelineSettings
from crfiqa.training.closed_form import all_copies, cr_targets, crop_features, load_run
from crfiqa.training.heads import ridge_fit


def column_groups(embedding_size: int, channels: list[int], taps: list[str]) -> dict[str, np.ndarray]:
    """Column indices of each part of the feature_stats head's input."""
    groups = {"unit": np.arange(embedding_size), "norm": np.array([embedding_size])}
    start = embedding_size + 1
    for tap, c in zip(taps, channels):
        groups[tap] = np.arange(start, start + 2 * c)
        start += 2 * c
    return groups


def identity_weights(labels: torch.Tensor, power: float) -> torch.Tensor:
    """Row weights ∝ (faces of the row's identity) ** -power, mean 1: power 1 gives every identity the same
    total weight, so the many-photo identities stop dominating the fit."""
    w = torch.bincount(labels).double()[labels] ** -power
    return w * len(w) / w.sum()


def main(argv: list[str] | None = None) -> None:
    """Print one markdown table per dev set and FMR."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished closed_form run with a feature_stats head")
    p.add_argument("--set", action="append", required=True, help="NAME=DIR: an all-vs-all identity-folder dev set")
    p.add_argument("--recognition", default="sface_2021dec", help="the judge")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max-genuine-per-identity", type=int, default=40)
    args = p.parse_args(argv)

    cfg, model = load_run(args.run)
    groups = column_groups(model.embedding_size, model.qs.channels, cfg.taps)
    every = np.arange(model.qs.linear.in_features)
    last = cfg.taps[-1]
    variants = {
        "norm-aware head, clean faces only (v2-frozen)": (np.r_[groups["unit"], groups["norm"]], 1),
        "norm-aware head + degraded copies": (np.r_[groups["unit"], groups["norm"]], None),
        f"+ last map only ({last})": (np.r_[groups["unit"], groups["norm"], groups[last]], None),
        "all maps, clean faces only": (every, 1),
        "all maps, without the unit embedding": (every[model.embedding_size:], None),
        "shipped: all maps + degraded copies": (every, None),
        "shipped, identities weighted equally": (every, None, 1.0),
        "shipped, identities weighted by 1/sqrt(faces)": (every, None, 0.5),
    }
    dataset, embs, feats = all_copies(cfg, model, args.run)  # the run's shards
    labels = torch.tensor([label for _, label in dataset.samples])
    targets = cr_targets(embs, labels, dataset.num_classes, cfg.cr_target)
    fits = {}
    for name, (cols, n, *power) in variants.items():
        use = n or len(feats)
        lin = torch.nn.Linear(len(cols), 1)
        ridge_fit(lin, torch.cat([f[:, cols] for f in feats[:use]]), torch.cat(targets[:use]),
                  alpha=cfg.ridge_alpha * use * len(labels),
                  weights=identity_weights(labels, power[0]).repeat(use) if power else None)
        fits[name] = (cols, lin)

    pipe = Pipeline(PipelineSettings())
    judge = sources.recognition_model(args.recognition, pipe)
    for spec in args.set:
        set_name, _, root = spec.partition("=")
        proto = protocols.all_vs_all(root, 0, 0, args.max_genuine_per_identity)
        faces = sources.find_faces(proto, pipe, "center")
        ok = faces.ok
        feats = crop_features(model, faces.crops)
        q = {name: np.where(ok, lin(feats[:, cols]).detach().numpy()[:, 0], sources.FAILURE_QUALITY)
             for name, (cols, lin) in fits.items()}
        q["embedding norm (w600k_mbf)"] = sources.baseline("embedding_norm:w600k_mbf", faces, pipe)
        q["LightQNet"] = sources.baseline("lightqnet", faces, pipe)
        emb = sources.embed(faces, judge, False, None, "")
        pairs = ev.build_pairs(emb, q, proto.left, proto.right, proto.genuine, proto.cluster, ok, False)
        settings = ev.Settings(fmrs=(1e-3, 1e-4), protocols=("paper",), threshold_mode="fixed",
                               bootstrap=args.bootstrap)
        for fmr, res in ev.evaluate(pairs, settings)["results"].items():
            paper = res["paper"]
            print(f"\n{set_name}, FMR {fmr}: {res['false_non_matches_at_0']} false non-matches of {res['genuine']} "
                  f"at 0 % rejection, judge {args.recognition}\n")
            print("| variant | paper ERC AUC | minus embedding norm | minus LightQNet |\n|---|---|---|---|")
            for name in q:
                m = paper["methods"][name]
                cells = [f"{m['auc']:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"]
                for base in ("embedding norm (w600k_mbf)", "LightQNet"):
                    if name == base:
                        cells.append("")
                        continue
                    d = paper["differences"][f"{name} - {base}"]
                    flag = " **better**" if d["a_better"] else " worse" if d["a_worse"] else ""
                    cells.append(f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{flag}")
                print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

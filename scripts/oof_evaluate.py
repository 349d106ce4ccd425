"""Untouched evaluation of the v2 recipe: k-fold by identity over the training identities themselves.

The dev sets (a) and (b) chose the recipe (docs/model-card.md, "Licence and limits"), so their numbers carry
that selection. Here each fold's head is refitted from the run's feature shards *without* that fold's
identities (CR targets from the other folds' faces alone, the same ridge regression), then scores that fold's
photos; the pooled out-of-fold qualities are judged all-vs-all beside the embedding norm and LightQNet. No
image of these sets was used for any choice. What is measured is the recipe, not the shipped weights (which
saw every identity).

    python scripts/oof_evaluate.py runs/crfiqa_mbf_v2 --set lfw_train_ofiq=runs/oof_lfw_ofiq \\
        --set celeba_train=runs/celeba_split/train
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from crfiqa.evaluation import evaluate as ev
from crfiqa.evaluation import protocols, sources
from crfiqa.service.pipeline import Pipeline, PipelineSettings
from crfiqa.training.closed_form import all_copies, crop_features, fit_head, identity_folds, load_run

NORM, LIGHTQNET = "embedding norm (w600k_mbf)", "LightQNet"


def cell(value: float, ci: list[float], scale: float, digits: int) -> str:
    """``value [lo, hi]`` scaled."""
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def difference(d: dict, scale: float, digits: int, base_auc: float | None = None) -> str:
    """A paired difference with its interval, its size relative to ``base_auc`` and the verdict."""
    rel = f" ({d['diff'] / base_auc * 100:+.0f} %)" if base_auc else ""
    flag = " **better**" if d["a_better"] else " worse" if d["a_worse"] else ""
    return (f"{d['diff'] * scale:+.{digits}f} [{d['ci95'][0] * scale:+.{digits}f}, {d['ci95'][1] * scale:+.{digits}f}]"
            f"{rel}{flag}")


def main(argv: list[str] | None = None) -> None:
    """Print, per set and FMR, the methods' ISO EDC pAUC and paper ERC AUC and the recipe's paired differences."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished closed_form run with a feature_stats head")
    p.add_argument("--set", action="append", required=True,
                   help="NAME=DIR: identity folders of training identities (any photos of them, e.g. degraded)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=2029)
    p.add_argument("--recognition", default="sface_2021dec", help="the judge")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max-genuine-per-identity", type=int, default=40)
    p.add_argument("--max-impostors", type=int, default=2_000_000, help="a seeded sample of the impostor pairs")
    args = p.parse_args(argv)

    cfg, model = load_run(args.run)
    dataset, embs, feats = all_copies(cfg, model, args.run)  # the run's shards
    names = [Path(path).parent.name for path, _ in dataset.samples]
    labels = torch.tensor([label for _, label in dataset.samples])
    row_fold = identity_folds(names, args.folds, args.seed)
    fold_of = dict(zip(names, row_fold.tolist()))
    heads = []
    for fold in range(args.folds):
        keep = torch.from_numpy(row_fold != fold)
        lin = torch.nn.Linear(feats[0].shape[1], 1)
        fit_head(lin, cfg, [e[keep] for e in embs], [f[keep] for f in feats], labels[keep])
        heads.append(lin)

    pipe = Pipeline(PipelineSettings())
    judge = sources.recognition_model(args.recognition, pipe)
    method = f"v2 recipe, out-of-fold ({args.folds} folds by identity)"
    for spec in args.set:
        set_name, _, root = spec.partition("=")
        proto = protocols.all_vs_all(root, args.max_impostors, 0, args.max_genuine_per_identity)
        strangers = sorted(set(proto.identities) - set(fold_of))
        if strangers:
            raise SystemExit(f"{root}: {len(strangers)} identities are not training identities "
                             f"(e.g. {strangers[0]}): they belong to no fold")
        faces = sources.find_faces(proto, pipe, "center")
        x = crop_features(model, faces.crops)
        image_fold = np.array([fold_of[who] for who in proto.identities])
        raw = np.zeros(len(x))
        with torch.no_grad():
            for fold, lin in enumerate(heads):
                rows = image_fold == fold
                raw[rows] = lin(x[rows])[:, 0].numpy()
        q = {method: np.where(faces.ok, raw, sources.FAILURE_QUALITY),
             NORM: sources.baseline("embedding_norm:w600k_mbf", faces, pipe),
             LIGHTQNET: sources.baseline("lightqnet", faces, pipe)}
        emb = sources.embed(faces, judge, False, None, "")
        pairs = ev.build_pairs(emb, q, proto.left, proto.right, proto.genuine, proto.cluster, faces.ok, False)
        settings = ev.Settings(fmrs=(1e-3, 1e-4), protocols=("iso", "paper"), threshold_mode="fixed",
                               bootstrap=args.bootstrap)
        print(f"\n### {set_name}: {len(faces.ok)} images ({faces.failures} failures to assess), "
              f"{int(proto.genuine.sum()):,} genuine / {int((~proto.genuine).sum()):,} impostor comparisons, "
              f"judge {args.recognition}")
        for fmr, res in ev.evaluate(pairs, settings)["results"].items():
            iso, paper = res["iso"], res["paper"]
            print(f"\nFMR {fmr}: {res['false_non_matches_at_0']} false non-matches of {res['genuine']} at 0 % "
                  "rejection\n")
            print("| method | pAUC@0.2 ×1e3 | pAUC@0.3 ×1e3 | paper AUC |\n|---|---|---|---|")
            for m in q:
                pa = iso["methods"][m]["pauc"]
                print(f"| {m} | {cell(pa['0.2']['value'], pa['0.2']['ci95'], 1e3, 2)} | "
                      f"{cell(pa['0.3']['value'], pa['0.3']['ci95'], 1e3, 2)} | "
                      f"{cell(paper['methods'][m]['auc'], paper['methods'][m]['ci95'], 1, 4)} |")
            print(f"\n| {method} minus | pAUC@0.2 | pAUC@0.3 | paper AUC |\n|---|---|---|---|")
            for base in (NORM, LIGHTQNET):
                key = f"{method} - {base}"
                print(f"| {base} | {difference(iso['differences']['0.2'][key], 1e3, 2)} | "
                      f"{difference(iso['differences']['0.3'][key], 1e3, 2)} | "
                      f"{difference(paper['differences'][key], 1, 4, paper['methods'][base]['auc'])} |")


if __name__ == "__main__":
    main()

"""The 'frozen' ablation of the v2 recipe: pretrained backbone untouched, the norm-aware ``qs`` set to the
ridge regression of the leave-one-out CR of the clean training faces (no SGD step). Reads the clean pass
and the leave-one-out bank that ``crfiqa train`` saved in a v2 run directory and writes a checkpoint that
``crfiqa export`` takes."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from crfiqa.training.config import TrainConfig
from crfiqa.training.heads import ridge_init
from crfiqa.training.losses import LeaveOneOutCentres, certainty_target
from crfiqa.training.train import build_model


def main(argv: list[str] | None = None) -> None:
    """Write ``--out`` (a step-0 checkpoint) and print the fit's RMSE against the target's spread."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a crfiqa_mbf_v2 run directory (clean_embeddings.pt, loo_centres.pt)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cfg = TrainConfig(**yaml.safe_load((args.run / "config.yaml").read_text()))
    model = build_model(cfg)
    emb, labels = torch.load(args.run / "clean_embeddings.pt", weights_only=True)
    loo = LeaveOneOutCentres.from_state_dict(torch.load(args.run / "loo_centres.pt", weights_only=True))
    target = certainty_target(loo.cosines(emb, torch.arange(len(labels)), labels), labels, cfg.cr_target)[0]
    rmse = ridge_init(model.qs, emb, target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 0, "config": cfg.to_dict(), "backbone": model.state_dict()}, args.out)
    print(f"ridge fit of CR on {len(labels)} clean faces: RMSE {rmse:.4f} (CR std {target.std().item():.4f})")


if __name__ == "__main__":
    main()

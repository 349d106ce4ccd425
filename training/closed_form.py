"""``mode: closed_form``: the CR regression of CR-FIQA on a frozen pretrained backbone, solved exactly.

The paper trains the backbone and ``qs`` together. On this project's data (1,258 identities of 2-20 images)
fine-tuning the backbone loses more than it gains (docs/model-card.md, v2-finetuned), so this mode keeps the
pretrained recogniser and fits only the quality head: every training face, clean and in ``augment_copies``
degraded copies, goes once through the frozen network; CR (the paper's target, from leave-one-out class
centres of the clean embeddings) is regressed on the head's features by ridge regression (the closed-form
minimiser of the squared loss; no learning-rate schedule to tune). Features are written in shards, so an
interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from crfiqa.service.preprocess import to_blob
from crfiqa.training.checkpoint import weights_digest
from crfiqa.training.config import TrainConfig
from crfiqa.training.data import open_dataset
from crfiqa.training.data.augment import build_augmentations
from crfiqa.training.heads import FeatureStatsHead, head_features, head_linear, ridge_fit
from crfiqa.training.losses import LeaveOneOutCentres, certainty_target

SHARD = 2048  # faces per feature shard: the unit of resumption

log = logging.getLogger("crfiqa.train")


@torch.no_grad()
def head_inputs(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, the head's input features) of a normalised batch."""
    if isinstance(model.qs, FeatureStatsHead):
        embedding, maps = model.graph.run(images, model.taps)
        return embedding, FeatureStatsHead.features(embedding, maps)
    embedding = model.forward_features(images)
    return embedding, head_features(model.qs, embedding)


@torch.no_grad()
def crop_features(model: torch.nn.Module, crops: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The head's input features of aligned RGB uint8 crops [N,112,112,3] (the service's preprocessing)."""
    return torch.cat([head_inputs(model, torch.from_numpy(to_blob(crops[i:i + batch_size])))[1]
                      for i in range(0, len(crops), batch_size)])


def load_run(run: Path) -> tuple[TrainConfig, torch.nn.Module]:
    """A finished run's config and its model from ``latest.pt``, in eval mode."""
    from crfiqa.training.train import build_model, load_checkpoint  # train imports this module

    cfg = TrainConfig(**yaml.safe_load((run / "config.yaml").read_text()))
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(run / "latest.pt")["backbone"])
    return cfg, model.eval()


def copy_features(model: torch.nn.Module, dataset, copy: int, out: Path, batch_size: int, workers: int,
                  bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and head features of every face in one copy of the dataset (copy 0: clean), from
    shards on disk where they exist."""
    n = len(dataset)
    embs, feats = [], []
    for start in range(0, n, SHARD):
        path = out / "features" / f"copy{copy:02d}_{start // SHARD:05d}.pt"
        rows = min(n, start + SHARD) - start
        if path.exists():
            shard = torch.load(path, map_location="cpu", weights_only=True)
            if len(shard["embedding"]) != rows:
                raise ValueError(f"{path}: {len(shard['embedding'])} rows, expected {rows}: delete the shard")
        else:
            subset = torch.utils.data.Subset(dataset, range(start, min(n, start + SHARD)))
            e, f = [], []
            for images, _ in DataLoader(subset, batch_size=batch_size, num_workers=workers):
                a, b = head_inputs(model, images)
                e.append(a.float())
                f.append(b.float())
            shard = {"embedding": torch.cat(e), "features": torch.cat(f)}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(shard, tmp)
            tmp.replace(path)  # atomic: a killed run never leaves a half shard
        embs.append(shard["embedding"])
        feats.append(shard["features"])
        bar.update(len(shard["embedding"]))
    return torch.cat(embs), torch.cat(feats)


#: The settings that decide what a feature shard holds (augment_copies only decides how many copies there are;
#: the network is keyed by its weights, wherever its file lies).
SHARD_KEYS = ("data", "backbone", "quality_head", "taps", "augment", "max_per_identity", "seed")


def training_set(cfg: TrainConfig):
    """The fit's dataset (no augmentation; the copies set their own), in the order of its shards' rows."""
    return open_dataset(cfg.data, augment=[], max_per_identity=cfg.max_per_identity, seed=cfg.seed)


def samples_digest(dataset) -> str:
    """sha256 of the dataset's (sample, label) list: shards are only valid for exactly these faces."""
    def name(key: object) -> str:  # a file path, or (RecordIO, record index)
        return f"{key[0].rec}#{key[1]}" if isinstance(key, tuple) else str(key)

    return hashlib.sha256(repr([(name(k), label) for k, label in dataset.samples]).encode()).hexdigest()


def check_shards(cfg: TrainConfig, out: Path, dataset, model: torch.nn.Module) -> None:
    """Refuse to reuse feature shards written with other settings, other faces or another network's weights
    (they would be stale)."""
    # The network by its weights, not the init_backbone path: a file replaced at the same path is another
    # network. qs is left out: it is what the shards are fitted into (a finished run reopens its shards).
    key = {**{k: getattr(cfg, k) for k in SHARD_KEYS}, "faces": len(dataset), "samples": samples_digest(dataset),
           "weights": weights_digest(model, exclude=("qs.",))}
    path = out / "features" / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in key if old.get(k) != key[k])
        if changed:
            raise ValueError(f"{path.parent} holds features made with other {', '.join(changed)}: "
                             "delete it or choose another --out")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(key, indent=1))


def all_copies(cfg: TrainConfig, model: torch.nn.Module, out: Path) -> tuple[object, list[torch.Tensor], list[torch.Tensor]]:
    """(the training set, embeddings per copy, head features per copy): extracted, or reloaded from
    ``out``'s shards when they were made with these settings and faces."""
    dataset = training_set(cfg)
    check_shards(cfg, out, dataset, model)
    model.eval().requires_grad_(False)
    embs, feats = [], []
    copies = 1 + cfg.augment_copies
    with tqdm(total=copies * len(dataset), unit="face", desc="features", file=sys.stderr) as bar:
        for copy in range(copies):
            dataset.augment = [] if copy == 0 else build_augmentations(cfg.augment)
            dataset.set_epoch(copy)  # each copy draws its own degradations, reproducibly
            e, f = copy_features(model, dataset, copy, out, cfg.batch_size, cfg.workers, bar)
            embs.append(e)
            feats.append(f)
    return dataset, embs, feats


def cr_targets(embs: list[torch.Tensor], labels: torch.Tensor, num_classes: int, mode: str) -> list[torch.Tensor]:
    """CR of every face of every copy, from leave-one-out centres of the clean copy (``embs[0]``)."""
    loo = LeaveOneOutCentres(embs[0], labels, num_classes)
    index = torch.arange(len(labels))
    return [certainty_target(loo.cosines(e, index, labels), labels, mode)[0] for e in embs]


def fit_head(lin: torch.nn.Linear, cfg: TrainConfig, embs: list[torch.Tensor], feats: list[torch.Tensor],
             labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Ridge-fit ``lin`` to the CR of these faces in every copy (CR from these faces alone: a subset of the
    identities is its own training set); (the fit's RMSE, the targets)."""
    classes, index = torch.unique(labels, return_inverse=True)
    alone = torch.bincount(index)[index] < 2
    if alone.any():  # no leave-one-out centre: such a face has no CR (it would be 0 whatever the face)
        log.warning("%d identities with one face are left out of the fit", int(alone.sum()))
        keep = ~alone
        embs, feats = [e[keep] for e in embs], [f[keep] for f in feats]
        classes, index = torch.unique(labels[keep], return_inverse=True)
    targets = torch.cat(cr_targets(embs, index, len(classes), cfg.cr_target))
    x = torch.cat(feats)
    return ridge_fit(lin, x, targets, alpha=cfg.ridge_alpha * len(x)), targets


def identity_folds(identities: list[str], folds: int, seed: int) -> np.ndarray:
    """The fold of each face: identities (sorted, then shuffled with ``random.Random(seed)``) dealt round-robin
    into ``folds`` folds, so that no identity is in two folds."""
    order = sorted(set(identities))
    random.Random(seed).shuffle(order)
    fold_of = {who: k % folds for k, who in enumerate(order)}
    return np.array([fold_of[who] for who in identities], dtype=np.int64)


def fit_closed_form(cfg: TrainConfig, model: torch.nn.Module) -> dict:
    """Extract (or reload) the features of every copy, fit ``qs`` by ridge, save ``latest.pt``; the fit's
    numbers (also in ``fit.json``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset, embs, feats = all_copies(cfg, model, out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    labels = torch.tensor([label for _, label in dataset.samples])
    rmse, targets = fit_head(head_linear(model.qs), cfg, embs, feats, labels)
    report = {"faces": len(labels), "identities": dataset.num_classes, "rows": len(targets), "features": feats[0].shape[1],
              "cr_mean": float(targets.mean()), "cr_std": float(targets.std()), "rmse": rmse}
    torch.save({"step": 0, "config": cfg.to_dict(), "backbone": model.state_dict()}, out / "latest.pt")
    (out / "fit.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), file=sys.stderr)
    return report

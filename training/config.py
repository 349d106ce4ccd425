"""Typed training configuration: a YAML file (unknown keys are errors) overridden by CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

CONFIG_DIR = Path(str(resources.files("crfiqa.training"))) / "configs"


@dataclass
class TrainConfig:
    """Every hyper-parameter of a CR-FIQA run (defaults: the paper's CR-FIQA(S) settings)."""

    data: str = ""
    out: str = "runs/crfiqa"
    backbone: str = "iresnet50"
    init_backbone: str | None = None  # arcface_torch state dict (.pth/.pt) or .onnx recognition model
    embedding_size: int = 512
    head_init: str = "random"  # or "class_means": centres start at each class's mean normalised embedding
    mode: str = "simultaneous"  # "on_top": frozen backbone, only the head and qs train; "closed_form": frozen
    # backbone, qs fitted by ridge regression of CR (training/closed_form.py)
    quality_head: str = "linear"  # the paper's Linear(D -> 1) on the embedding, "norm": it also sees log|e|,
    # "feature_stats": log|e| and channel statistics of the backbone's feature maps named in ``taps``
    taps: list[str] = field(default_factory=list)  # ONNX tensor names of an imported backbone (feature_stats)
    augment_copies: int = 0  # closed_form: degraded copies of every face besides the clean one
    ridge_alpha: float = 0.1  # closed_form: ridge penalty per training row (on standardised features)
    qs_init: str = "default"  # or "ridge": qs starts at the ridge fit of CR on the clean pretrained embeddings
    cr_centres: str = "head"  # CR from the ArcFace centres (paper), or "loo": leave-one-out class means
    freeze_fraction: float = 0.0  # imported ONNX backbones: freeze this share of the early nodes
    batch_size: int = 128  # per process; the global batch is batch_size x world size
    lr: float = 0.1
    backbone_lr_mult: float = 1.0
    quality_lr_mult: float = 1.0  # the qs unit's lr = lr x this (see configs/lfw_mbf.yaml for why one may lower it)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [20000, 28000])
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    max_steps: int = 32000
    scale: float = 64.0
    margin: float = 0.5
    cr_target: str = "paper"
    quality_weight: float = 10.0
    smooth_l1_beta: float = 0.5
    grad_clip: float = 5.0
    max_per_identity: int = 0
    augment: list[str] = field(default_factory=lambda: ["flip"])
    seed: int = 0
    workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 0  # keep the newest this many checkpoint files (0 = all)
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        if self.mode not in ("simultaneous", "on_top", "closed_form"):
            raise ValueError(f"mode must be simultaneous, on_top or closed_form, not {self.mode!r}")
        if self.head_init not in ("random", "class_means"):
            raise ValueError(f"head_init must be random or class_means, not {self.head_init!r}")
        if self.quality_head not in ("linear", "norm", "feature_stats"):
            raise ValueError(f"quality_head must be linear, norm or feature_stats, not {self.quality_head!r}")
        if self.quality_head == "feature_stats" and not (self.taps and self.mode == "closed_form"):
            raise ValueError("quality_head feature_stats needs taps (tensor names) and mode closed_form")
        if self.augment_copies < 0 or self.ridge_alpha < 0:
            raise ValueError("augment_copies and ridge_alpha must not be negative")
        if self.qs_init not in ("default", "ridge"):
            raise ValueError(f"qs_init must be default or ridge, not {self.qs_init!r}")
        if self.cr_centres not in ("head", "loo"):
            raise ValueError(f"cr_centres must be head or loo, not {self.cr_centres!r}")
        if self.cr_target not in ("paper", "official", "ccs"):
            raise ValueError(f"cr_target must be paper, official or ccs, not {self.cr_target!r}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("batch_size and max_steps must be positive")

    def to_dict(self) -> dict:
        """Plain-type dict (saved beside every checkpoint)."""
        return dataclasses.asdict(self)


def _read(path: str | Path) -> dict:
    """A config file's values, resolving ``base: <config>`` (the base's values, then this file's)."""
    p = Path(path)
    if not p.is_file():
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.is_file():
        shipped = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no config {path!r} (a YAML file, or one of: {shipped})")
    values = yaml.safe_load(p.read_text()) or {}
    base = values.pop("base", None)
    return {**_read(base), **values} if base else values


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Read ``path`` (a file, or a shipped config name such as ``casia_r50``) and apply non-None overrides."""
    values = _read(path) if path is not None else {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)

"""The CR-FIQA training loop, readable top to bottom: build, loop, log, checkpoint.

Runs as one CPU process or under ``torchrun`` (DDP: NCCL on GPU, gloo on CPU). Only rank 0 writes.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from crfiqa.training.backbones import QualityNet, create_backbone
from crfiqa.training.backbones.onnx_import import OnnxBackbone
from crfiqa.training.checkpoint import load_state_dict_checked, weights_digest
from crfiqa.training.closed_form import fit_closed_form
from crfiqa.training.config import TrainConfig
from crfiqa.training.data import open_dataset
from crfiqa.training.data.augment import build_augmentations
from crfiqa.training.heads import build_quality_head, ridge_init
from crfiqa.training.losses import ArcFaceHead, CRFIQALoss, LeaveOneOutCentres, certainty_target

log = logging.getLogger("crfiqa.train")
LOG_COLUMNS = ["step", "epoch", "loss", "ce_loss", "quality_loss", "lr", "samples_per_s", "ccs", "nnccs", "cr", "qs"]


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """True on the process that logs and writes."""
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun job if there is one (NCCL on GPU, gloo on CPU); else one local process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return Dist(rank, world, torch.device("cuda", local))
    return Dist(rank, world, torch.device("cpu"))


class EpochSampler(Sampler[int]):
    """Seeded permutation per epoch, split across ranks (padded to divide evenly), resumable mid-epoch."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_rank = math.ceil(n / world)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use ``epoch``'s order, starting after ``skip`` samples of this rank's share."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]
        return iter(order[self.rank::self.world][self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def load_init_backbone(model: QualityNet, path: str) -> None:
    """Load an arcface_torch-layout iResNet state dict (shapes checked; ``qs`` stays fresh)."""
    load_state_dict_checked(model, torch.load(path, map_location="cpu", weights_only=True), path, exclude=("qs.",))


def build_model(cfg: TrainConfig) -> QualityNet:
    """The backbone with its quality head, initialised as the config says."""
    if cfg.init_backbone and cfg.init_backbone.endswith(".onnx"):
        model = create_backbone(f"onnx:{cfg.init_backbone}")
        if cfg.freeze_fraction > 0:
            model.freeze_prefix(cfg.freeze_fraction)
    else:
        model = create_backbone(cfg.backbone, embedding_size=cfg.embedding_size)
        if cfg.init_backbone:
            load_init_backbone(model, cfg.init_backbone)
    if cfg.quality_head == "feature_stats":
        if not isinstance(model, OnnxBackbone):
            raise ValueError("quality_head feature_stats taps an imported ONNX backbone: set init_backbone to an .onnx")
        model.taps = tuple(cfg.taps)
        model.qs = build_quality_head(cfg.quality_head, model.embedding_size, model.tap_channels(cfg.taps))
    elif cfg.quality_head != "linear":
        model.qs = build_quality_head(cfg.quality_head, model.embedding_size)
    return model


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then / (1 / lr_gamma) at each milestone."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * cfg.lr_gamma ** sum(step >= m for m in cfg.milestones)


def build_optimizer(cfg: TrainConfig, model: QualityNet, head: ArcFaceHead) -> torch.optim.Optimizer:
    """SGD with separate groups for the backbone, the quality unit and the class centres."""
    groups = [{"params": list(model.qs.parameters()), "lr": cfg.lr * cfg.quality_lr_mult},
              {"params": list(head.parameters()), "lr": cfg.lr}]
    if cfg.mode == "simultaneous":
        feats = [p for p in model.feature_parameters() if p.requires_grad]
        groups.insert(0, {"params": feats, "lr": cfg.lr * cfg.backbone_lr_mult})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def clean_embeddings(model: QualityNet, dataset, device: torch.device, batch_size: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw embeddings [N, D], labels [N]) of every sample without augmentation, in eval mode."""
    augment, dataset.augment = dataset.augment, []
    was_training = model.training
    model.eval()
    embs, labs = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        embs.append(model.forward_features(images.to(device)).float().cpu())
        labs.append(labels)
    dataset.augment = augment
    model.train(was_training)
    return torch.cat(embs), torch.cat(labs)


def class_mean_centres(model: QualityNet, dataset, device: torch.device, batch_size: int = 64,
                       clean: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Each class's mean normalised embedding (no augmentation, eval mode): with a pretrained backbone,
    the certainty ratio is meaningful from the first step instead of after the centres converge."""
    emb, labels = clean if clean is not None else clean_embeddings(model, dataset, device, batch_size)
    sums = torch.zeros(dataset.num_classes, emb.shape[1]).index_add_(0, labels, torch.nn.functional.normalize(emb))
    return torch.nn.functional.normalize(sums)


class Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their index (the leave-one-out centres need it)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def prepare_targets(cfg: TrainConfig, model: QualityNet, head: ArcFaceHead, dataset, device: torch.device,
                    out: Path, resume: bool) -> LeaveOneOutCentres | None:
    """Initialise the centres and ``qs`` from one clean pass (fresh runs), and build the leave-one-out
    centres (saved in the run directory: a resumed run reuses the fresh run's bank)."""
    bank_path = out / "loo_centres.pt"
    if resume and cfg.cr_centres == "loo" and bank_path.exists():
        return LeaveOneOutCentres.from_state_dict(torch.load(bank_path, map_location="cpu", weights_only=True))
    needs_pass = cfg.cr_centres == "loo" or (not resume and (cfg.head_init == "class_means" or cfg.qs_init == "ridge"))
    if not needs_pass:
        return None
    cache = out / "clean_embeddings.pt"  # the pretrained model's clean pass: a resumed run must not redo it
    # Keyed by the initial weights and the data, so a pass of another model or dataset is never reused.
    key = f"{weights_digest(model)}:{cfg.data}:{len(dataset)}"
    saved = torch.load(cache, map_location="cpu", weights_only=True) if cache.exists() else None
    if isinstance(saved, dict) and saved.get("key") == key:
        clean = (saved["embeddings"], saved["labels"])
    else:
        clean = clean_embeddings(model, dataset, device)
        if dist_main():
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "embeddings": clean[0], "labels": clean[1]}, cache)
    loo = LeaveOneOutCentres(clean[0], clean[1], dataset.num_classes) if cfg.cr_centres == "loo" else None
    if loo is not None and dist_main():
        out.mkdir(parents=True, exist_ok=True)
        torch.save(loo.state_dict(), bank_path)
    if resume:
        return loo
    if cfg.head_init == "class_means":
        head.weight.data.copy_(class_mean_centres(model, dataset, device, clean=clean))
    if cfg.qs_init == "ridge":
        emb, labels = clean
        if loo is not None:
            cos = loo.cosines(emb, torch.arange(len(labels)), labels)
        else:
            cos = head.cosines(emb)
        target = certainty_target(cos, labels, cfg.cr_target)[0]
        rmse = ridge_init(model.qs, emb, target)
        log.info("qs initialised by ridge regression of CR on %d clean embeddings (RMSE %.4f)", len(labels), rmse)
    return loo


def dist_main() -> bool:
    """True on rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(path: Path, cfg: TrainConfig, step: int, model: QualityNet, head: ArcFaceHead,
                    optimizer: torch.optim.Optimizer) -> None:
    """Everything needed to continue exactly (atomic write)."""
    state = {"step": step, "config": cfg.to_dict(), "backbone": model.state_dict(), "head": head.state_dict(),
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "python_rng": list(random.getstate()[1]), "scheduler": {"step": step}}
    if torch.cuda.is_available():  # dropout masks on the GPU come from its generator: this rank's device's
        state["cuda_rng"] = torch.cuda.get_rng_state()  # (every rank's is seeded and advanced alike)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


#: Settings a resumed run may change: where it writes, how long it runs, how it logs and which resources it uses.
RESUMABLE_CHANGES = ("out", "max_steps", "workers", "threads", "log_every", "checkpoint_every", "keep_checkpoints")


def check_resume(cfg: TrainConfig, saved: TrainConfig, source: str | Path) -> None:
    """Refuse to continue a checkpoint under settings that change what it trains (data, model, loss, optimiser,
    schedule): the run would silently be neither the saved one nor the asked one."""
    def same(key: str) -> bool:
        a, b = getattr(cfg, key), getattr(saved, key)
        if key in ("data", "init_backbone") and a and b:
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    changed = [k for k in cfg.to_dict() if k not in RESUMABLE_CHANGES and not same(k)]
    if changed:
        listing = "; ".join(f"{k}: {getattr(saved, k)!r} there, {getattr(cfg, k)!r} here" for k in changed)
        raise ValueError(f"{source} was trained with other settings ({listing}): resume with its config "
                         "(the run directory's config.yaml), or start a new run")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or the ``latest.pt`` of a run directory (tensors and plain types only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "latest.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def check_closed_form_resume(cfg: TrainConfig, resume: str | None) -> None:
    """A closed_form run always resumes from the feature shards in its own ``out``; ``--resume`` naming
    another run would be silently ignored, so it is refused."""
    if resume is None:
        return
    out = Path(cfg.out).resolve()
    if Path(resume).resolve() not in (out, out / "latest.pt"):
        raise ValueError(f"mode closed_form resumes from the feature shards in its own out ({cfg.out}), not from "
                         f"{resume}: rerun with --out set to that run, or drop --resume")


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run (or continue) a training job; returns the last step's numbers and the weights digest."""
    d = setup_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.mode == "closed_form":  # one pass of a frozen network and a solve; resumes from its feature shards
        if d.world > 1:
            raise ValueError("mode closed_form runs in one process (no torchrun)")
        check_closed_form_resume(cfg, resume)
        return fit_closed_form(cfg, build_model(cfg))
    dataset = open_dataset(cfg.data, augment=build_augmentations(cfg.augment),
                           max_per_identity=cfg.max_per_identity, seed=cfg.seed)
    model = build_model(cfg).to(d.device)
    head = ArcFaceHead(model.embedding_size, dataset.num_classes, cfg.scale, cfg.margin).to(d.device)
    criterion = CRFIQALoss(head, cfg.cr_target, cfg.quality_weight, cfg.smooth_l1_beta)
    optimizer = build_optimizer(cfg, model, head)
    step = 0
    out = Path(cfg.out)
    if resume is None and any(out.glob("checkpoint_*.pt")):
        # A fresh run here would mix its checkpoints with another run's (and pruning would delete its own).
        raise ValueError(f"{out} holds another run's checkpoints: continue it with --resume, or use a new out")
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        check_resume(cfg, TrainConfig(**ckpt["config"]), resume)
    loo = prepare_targets(cfg, model, head, dataset, d.device, out, resume is not None)
    if ckpt is not None:
        model.load_state_dict(ckpt["backbone"])
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate((3, tuple(ckpt["python_rng"]), None))
        if "cuda_rng" in ckpt and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        step = int(ckpt["step"])
    if cfg.mode == "on_top":
        for p in model.feature_parameters():
            p.requires_grad_(False)
    net: nn.Module = model
    quality_unit: nn.Module = model.qs
    train_head: nn.Module = head
    if d.world > 1:
        # on_top: the frozen backbone runs outside autograd, so the trainable qs is wrapped on its own
        # (through the backbone's wrapper its gradients would never be all-reduced).
        if cfg.mode == "on_top":
            quality_unit = DistributedDataParallel(model.qs)
        else:
            net = DistributedDataParallel(model)
        train_head = DistributedDataParallel(head)
    criterion.head = train_head

    sampler = EpochSampler(len(dataset), cfg.seed, d.rank, d.world)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} x {d.world} is larger than the dataset ({len(dataset)})")
    writer = _Logger(out, cfg, resume is not None) if d.main else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda")
    last: dict = {}
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", file=sys.stderr, disable=not d.main or None)
    while step < cfg.max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, offset * cfg.batch_size)
        loader = DataLoader(Indexed(dataset), batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
                            persistent_workers=False)
        t0 = time.perf_counter()
        for images, labels, index in loader:
            images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(cfg, step)
            net.train()
            if cfg.mode == "on_top":
                model.eval()  # frozen backbone: BatchNorm statistics stay as pretrained
            with amp:
                if cfg.mode == "on_top":
                    with torch.no_grad():
                        emb = model.forward_features(images)
                    quality = quality_unit(emb)
                else:
                    emb, quality = net(images)
                target_cos = loo.cosines(emb, index, labels) if loo is not None else None
                result = criterion(emb, quality, labels, target_cos)
            optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            if cfg.grad_clip > 0:
                # The network's gradients only, as arcface_torch and CR-FIQA clip (backbone.parameters()): the
                # ArcFace centres' gradients, large early on, would otherwise shrink the backbone's step.
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            last = {"step": step, "epoch": epoch, "loss": result.total.item(), "ce_loss": result.ce_loss.item(),
                    "quality_loss": result.quality_loss.item(), "lr": optimizer.param_groups[-1]["lr"],
                    "samples_per_s": cfg.batch_size * d.world / max(elapsed, 1e-9), **result.report}
            if writer is not None:
                writer.row(last, step % cfg.log_every == 0 or step == cfg.max_steps)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    save_checkpoint(out / f"checkpoint_{step:06d}.pt", cfg, step, model, head, optimizer)
                    os.replace(_link(out, step), out / "latest.pt")
                    _prune(out, cfg.keep_checkpoints)
            if not math.isfinite(last["loss"]):
                log.warning("loss is %s at step %d (the %s CR target can diverge with few classes)",
                            last["loss"], step, cfg.cr_target)
            if step >= cfg.max_steps:
                break
    bar.close()
    if dist.is_initialized():
        # DDP keeps parameters equal; BatchNorm statistics are broadcast from rank 0 only at the next
        # forward, so do it once more: every rank then ends with rank 0's (the saved) state.
        for buffer in [*model.buffers(), *head.buffers()]:
            dist.broadcast(buffer, src=0)
    digest = weights_digest(model, head)
    print(f"rank {d.rank} weights_sha256 {digest}", flush=True)
    if writer is not None:
        writer.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {**last, "weights_sha256": digest}


def _prune(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint files (``latest.pt`` is a separate link)."""
    if keep > 0:
        for old in sorted(out.glob("checkpoint_*.pt"))[:-keep]:
            old.unlink()


def _link(out: Path, step: int) -> Path:
    """A fresh copy of checkpoint ``step`` to be renamed onto ``latest.pt`` (atomic replace)."""
    src = out / f"checkpoint_{step:06d}.pt"
    tmp = out / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    return tmp


class _Logger:
    """stdout lines, ``log.csv`` (every step) and TensorBoard when installed; rank 0 only."""

    def __init__(self, out: Path, cfg: TrainConfig, append: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        path = out / "log.csv"
        fresh = not (append and path.exists())
        self.fh = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115
        self.csv = csv.DictWriter(self.fh, LOG_COLUMNS, extrasaction="ignore")
        if fresh:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            self.tb = None

    def row(self, values: dict, show: bool) -> None:
        """Record one step; print it when ``show``."""
        self.csv.writerow(values)
        self.fh.flush()
        if self.tb is not None:
            for k in LOG_COLUMNS[2:]:
                self.tb.add_scalar(k, values[k], values["step"])
        if show:
            print(" ".join(f"{k}={values[k]:.4g}" if isinstance(values[k], float) else f"{k}={values[k]}"
                           for k in LOG_COLUMNS), flush=True)

    def close(self) -> None:
        """Flush and close."""
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def main(argv: list[str] | None = None) -> dict:
    """``crfiqa train``: config file + flag overrides."""
    from crfiqa.training.cli import train_parser

    args = train_parser().parse_args(argv)
    return run(args)


def run(args) -> dict:
    """Train from parsed ``crfiqa train`` arguments."""
    from crfiqa.training.config import load_config

    cfg = load_config(args.config, data=args.data, backbone=args.backbone, batch_size=args.batch_size, lr=args.lr,
                      max_steps=args.max_steps, out=args.out, init_backbone=args.init_backbone,
                      cr_target=args.cr_target, seed=args.seed, mode=args.mode, workers=args.workers)
    if not cfg.data:
        raise SystemExit("crfiqa train: --data (or `data:` in the config) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()

"""ONNX export of a trained model: the quality-model contract, torch/ONNX Runtime parity, calibration, manifest entry."""

from __future__ import annotations

import datetime
import logging
import math
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crfiqa.service.facemodel import calibrate
from crfiqa.service.preprocess import QUALITY_INPUT, to_blob
from crfiqa.service.registry import Calibration, sha256_file
from crfiqa.service.runtime import create_session
from crfiqa.training.backbones import QualityNet, create_backbone
from crfiqa.training.config import TrainConfig

log = logging.getLogger("crfiqa.export")
OPSET = 17
PARITY_TOLERANCE = 1e-4
#: logit(0.8): with scale = (p90 - p10) / (2 * this), the 10th/90th percentiles map to 20/80.
LOGIT_80 = math.log(4.0)


class _Contract(nn.Module):
    """The exported graph: ``input`` [N,3,112,112] -> ``embedding`` [N,D], ``quality`` [N,1]."""

    def __init__(self, model: QualityNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out.embedding, out.quality


def export_onnx(model: QualityNet, out: str | Path) -> Path:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch, opset 17."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    torch.onnx.export(_Contract(model), (torch.zeros(2, 3, 112, 112),), str(out), input_names=["input"],
                      output_names=["embedding", "quality"], opset_version=OPSET, dynamo=False,
                      dynamic_axes={"input": {0: "N"}, "embedding": {0: "N"}, "quality": {0: "N"}})
    return out


def check_parity(model: QualityNet, onnx_path: str | Path, crops: np.ndarray | None = None, seed: int = 0) -> float:
    """Largest |torch - ONNX Runtime| over random inputs and real crops, relative to the output scale."""
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)]
    if crops is not None and len(crops):
        inputs.append(to_blob(crops[:32], QUALITY_INPUT))
    session = create_session(onnx_path, ("CPUExecutionProvider",))
    worst = 0.0
    model = model.eval().cpu()
    for x in inputs:
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        got = session.run(["embedding", "quality"], {"input": x})
        for r, g in zip((ref.embedding.numpy(), ref.quality.numpy()), got):
            worst = max(worst, float(np.abs(r - g).max() / max(1.0, np.abs(r).max())))
    if worst > PARITY_TOLERANCE:
        raise ValueError(f"ONNX export differs from torch by {worst:.2e} (relative), over {PARITY_TOLERANCE}")
    return worst


def fit_calibration(raw: np.ndarray) -> Calibration:
    """Centre = median raw score; scale so the 10th/90th percentiles map to about 20/80."""
    p10, p50, p90 = np.percentile(np.asarray(raw, dtype=np.float64), [10, 50, 90])
    return Calibration(centre=float(p50), scale=float(max((p90 - p10) / (2 * LOGIT_80), 1e-6)))


def onnx_quality(onnx_path: str | Path, crops: np.ndarray, batch: int = 64) -> np.ndarray:
    """Raw quality of aligned RGB crops from the exported file."""
    session = create_session(onnx_path, ("CPUExecutionProvider",))
    parts = [session.run(["quality"], {"input": to_blob(crops[i:i + batch], QUALITY_INPUT)})[0]
             for i in range(0, len(crops), batch)]
    return np.concatenate(parts)[:, 0] if parts else np.zeros(0)


def write_sidecar(onnx_path: Path, name: str, arch: str, calibration: Calibration, provenance: dict,
                  licence: str, version: str = "1") -> Path:
    """``<model>.toml``: the manifest entry for this file (also what ``--model PATH.onnx`` reads)."""
    lines = [
        "[model]", f'name = "{name}"', 'role = "quality"', 'family = "crfiqa"', f'version = "{version}"',
        f'file = "{onnx_path.name}"', f'sha256 = "{sha256_file(onnx_path)}"', f"size = {onnx_path.stat().st_size}",
        f'licence = "{licence}"', f'description = "CR-FIQA quality model ({arch})"',
        'input = { size = 112, colour = "RGB", mean = 127.5, std = 127.5 }',
        'outputs = { quality = "quality", embedding = "embedding" }',
        f"calibration = {{ centre = {calibration.centre:.6f}, scale = {calibration.scale:.6f} }}",
        "provenance = { " + ", ".join(f'{k} = "{v}"' for k, v in {"arch": arch, **provenance}.items()) + " }",
    ]
    path = onnx_path.with_suffix(".toml")
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_crops(paths: list[str], limit: int = 2000) -> np.ndarray:
    """Aligned crops of reference images (through the service pipeline: one face per image, centre rule)."""
    from crfiqa.service.imaging import list_images
    from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings

    pipe = Pipeline(PipelineSettings(providers=("CPUExecutionProvider",)))
    images = list_images(paths)
    images = images[:: max(1, len(images) // limit)][:limit]  # spread over all identities, not the first few
    # Aligned training crops (112x112) are used as they are; other images go through detection.
    aligned = bool(images) and pipe.decode(images[0]).rgb.shape[:2] == (112, 112)
    crops = []
    for _, prepared in pipe.run(images, Options(aligned=aligned, select="center"), score=False):
        if len(prepared.crops):
            crops.append(prepared.crops[:1])
    return np.concatenate(crops) if crops else np.zeros((0, 112, 112, 3), np.uint8)


def finish_export(model: QualityNet, out: Path, arch: str, name: str, reference: list[str] | None,
                  provenance: dict, licence: str) -> dict:
    """Export, check parity, calibrate on the reference faces, and write the sidecar manifest entry."""
    export_onnx(model, out)
    crops = reference_crops(reference) if reference else None
    diff = check_parity(model, out, crops)
    if crops is not None and len(crops):
        calibration = fit_calibration(onnx_quality(out, crops))
    else:
        log.warning("no reference faces: calibration left at centre 0, scale 1 (pass --reference DIR)")
        calibration = Calibration()
    provenance = {"exported": datetime.date.today().isoformat(), "commit": _commit(), **provenance}
    sidecar = write_sidecar(out, name, arch, calibration, provenance, licence)
    score = calibrate(np.array([calibration.centre]), calibration)[0]
    return {"onnx": str(out), "sidecar": str(sidecar), "parity": diff, "centre": calibration.centre,
            "scale": calibration.scale, "score_at_centre": float(score), "reference_faces": 0 if crops is None else len(crops)}


def _commit() -> str:
    """The repository commit this code runs from (or 'unknown')."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def export_checkpoint(ckpt_path: str, out: str, reference: list[str] | None = None, name: str | None = None) -> dict:
    """``crfiqa export``: a training checkpoint -> quality ONNX model + manifest entry."""
    from crfiqa.training.train import build_model, load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig(**ckpt["config"])
    if cfg.init_backbone and cfg.init_backbone.endswith(".onnx"):
        model = build_model(cfg)
    else:
        model = create_backbone(cfg.backbone, embedding_size=cfg.embedding_size)
    model.load_state_dict(ckpt["backbone"])
    arch = f"onnx:{Path(cfg.init_backbone).name}" if cfg.init_backbone and cfg.init_backbone.endswith(".onnx") else cfg.backbone
    provenance = {"data": cfg.data, "init": cfg.init_backbone or "scratch", "step": str(ckpt["step"]),
                  "cr_target": cfg.cr_target, "mode": cfg.mode}
    return finish_export(model, Path(out), arch, name or Path(out).stem, reference, provenance,
                         licence="derived from the training data and init weights: check both")

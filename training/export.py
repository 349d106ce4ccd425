"""ONNX export of a trained model: the quality-model contract, torch/ONNX Runtime parity, calibration, manifest entry."""

from __future__ import annotations

import datetime
import logging
import math
import subprocess
import tempfile
import tomllib
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import tomli_w
import torch
from torch import nn

from crfiqa.service.facemodel import QualityModel, calibrate
from crfiqa.service.preprocess import QUALITY_INPUT, to_blob
from crfiqa.service.registry import Calibration, ModelEntry, sha256_file
from crfiqa.service.runtime import create_session
from crfiqa.training.backbones import QualityNet
from crfiqa.training.config import TrainConfig
from crfiqa.training.optimise import OptimiseReport, op_counts, optimise_onnx

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


def export_raw(model: QualityNet, out: str | Path) -> Path:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch, opset 17, as torch exports it (unoptimised)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    # Eval-mode export folds Conv+BatchNorm itself; a BatchNorm after a Linear is folded by optimise_onnx.
    # The TorchScript exporter on purpose (dynamo=False): it needs no onnxscript and gives the plain graph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_Contract(model), (torch.zeros(2, 3, 112, 112),), str(out), input_names=["input"],
                          output_names=["embedding", "quality"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input": {0: "N"}, "embedding": {0: "N"}, "quality": {0: "N"}})
    return out


def export_onnx(model: QualityNet, out: str | Path, optimise: bool = True,
                crops: np.ndarray | None = None) -> Path:
    """Write ``model`` as ONNX; ``optimise`` (default) runs ``optimise_onnx`` last, parity-checked against the
    unoptimised export on random inputs and ``crops`` (aligned RGB faces)."""
    if not optimise:
        return export_raw(model, out)
    optimised_export(model, out, crops)
    return Path(out)


def optimised_export(model: QualityNet, out: str | Path, crops: np.ndarray | None = None) -> OptimiseReport:
    """Export unoptimised to a temporary file, then write the optimised graph to ``out``; the report."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = export_raw(model, Path(tmp) / "raw.onnx")
        return optimise_onnx(raw, out, _blobs(crops))


def _blobs(crops: np.ndarray | None) -> list[np.ndarray]:
    """Model inputs (batches of at most 32) of aligned RGB crops, for parity checks."""
    if crops is None or not len(crops):
        return []
    return [to_blob(crops[i:i + 32], QUALITY_INPUT) for i in range(0, min(len(crops), 128), 32)]


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


def onnx_quality(onnx_path: str | Path, crops: np.ndarray) -> np.ndarray:
    """Raw quality of aligned RGB crops from the exported file (the service's quality adapter, which chunks)."""
    path = Path(onnx_path)
    entry = ModelEntry(name=path.stem, role="quality", family="crfiqa", file=path.name, sha256=None)
    return QualityModel(path, entry, ("CPUExecutionProvider",)).predict(crops)


def sidecar_table(name: str, description: str, calibration: Calibration, licence: str, provenance: dict,
                  version: str = "1") -> dict:
    """The ``[model]`` table of a quality model of the CR-FIQA contract (file, hash and size are added on write)."""
    return {
        "name": name, "role": "quality", "family": "crfiqa", "version": version, "licence": licence,
        "description": description,
        "input": {"size": 112, "colour": "RGB", "mean": 127.5, "std": 127.5},
        "outputs": {"quality": "quality", "embedding": "embedding"},
        "calibration": {"centre": round(calibration.centre, 6), "scale": round(calibration.scale, 6)},
        "provenance": {k: str(v) for k, v in provenance.items()},
    }


def write_sidecar(onnx_path: Path, name: str, arch: str, calibration: Calibration, provenance: dict,
                  licence: str, version: str = "1") -> Path:
    """``<model>.toml``: the manifest entry for this file (also what ``--model PATH.onnx`` reads)."""
    table = sidecar_table(name, f"CR-FIQA quality model ({arch})", calibration, licence,
                          {"arch": arch, **provenance}, version)
    return write_sidecar_table(onnx_path, table)


def write_sidecar_table(onnx_path: Path, table: dict) -> Path:
    """Write ``[model]`` = ``table`` with this file's name, sha256 and size beside ``onnx_path`` (a TOML writer:
    any string, quotes and backslashes included, round-trips)."""
    table = {**table, "file": onnx_path.name, "sha256": sha256_file(onnx_path), "size": onnx_path.stat().st_size}
    path = onnx_path.with_suffix(".toml")
    path.write_text(tomli_w.dumps({"model": table}))
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
    """Export (optimised), check parity, calibrate on the reference faces, and write the sidecar manifest entry."""
    crops = reference_crops(reference) if reference else None
    report = optimised_export(model, out, crops)
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
            "scale": calibration.scale, "score_at_centre": float(score), "reference_faces": 0 if crops is None else len(crops),
            "optimised": report.to_dict(), "ops": op_counts(out)}


def _commit() -> str:
    """The repository commit this code runs from (or 'unknown')."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def reoptimise(src: str | Path, out: str | Path, reference: list[str] | None = None, name: str | None = None) -> dict:
    """``crfiqa export MODEL.onnx``: re-optimise an existing quality export (no checkpoint needed).

    Parity with ``src`` is checked on random inputs and the reference faces. The sidecar of ``src`` (if any) is
    carried over with the new hash; without one, the calibration is fitted on the reference faces."""
    src, out = Path(src), Path(out)
    _check_contract(src)
    crops = reference_crops(reference) if reference else None
    old_sidecar = src.with_suffix(".toml")
    table = tomllib.loads(old_sidecar.read_text()).get("model", {}) if old_sidecar.is_file() else None
    source = f"{src.name} (sha256 {sha256_file(src)})"  # before an in-place rewrite replaces it
    report = optimise_onnx(src, out, _blobs(crops))
    if table is None:
        calibration = fit_calibration(onnx_quality(out, crops)) if crops is not None and len(crops) else Calibration()
        table = sidecar_table(name or out.stem, f"CR-FIQA quality model (from {src.name})", calibration,
                              "unknown: as the source model's", {})
    if name:
        table["name"] = name
    table["provenance"] = {**table.get("provenance", {}), "optimised_from": source,
                           "optimised": datetime.date.today().isoformat()}
    sidecar = write_sidecar_table(out, table)
    return {"onnx": str(out), "sidecar": str(sidecar), "optimised": report.to_dict(), "ops": op_counts(out),
            "reference_faces": 0 if crops is None else len(crops)}


def _check_contract(path: Path) -> None:
    """Refuse a graph that is not a quality model of the contract (one input, outputs quality and embedding)."""
    session = create_session(path, ("CPUExecutionProvider",))
    outputs = {o.name for o in session.get_outputs()}
    if len(session.get_inputs()) != 1 or not {"quality", "embedding"} <= outputs:
        raise ValueError(f"{path} is not a quality model of the CR-FIQA contract (outputs {sorted(outputs)})")


def export_checkpoint(ckpt_path: str, out: str, reference: list[str] | None = None, name: str | None = None) -> dict:
    """``crfiqa export``: a training checkpoint -> quality ONNX model + manifest entry (an ``.onnx``: re-optimised)."""
    from crfiqa.training.train import build_model, load_checkpoint

    if str(ckpt_path).endswith(".onnx"):
        return reoptimise(ckpt_path, out, reference, name)

    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig(**ckpt["config"])
    onnx_init = bool(cfg.init_backbone and cfg.init_backbone.endswith(".onnx"))
    # The training run's architecture, quality head included (a norm head has other weights than linear);
    # torch init weights are not read again: the checkpoint replaces them.
    model = build_model(cfg if onnx_init else replace(cfg, init_backbone=None))
    model.load_state_dict(ckpt["backbone"])
    arch = f"onnx:{Path(cfg.init_backbone).name}" if onnx_init else cfg.backbone
    provenance = {"data": cfg.data, "init": cfg.init_backbone or "scratch", "step": str(ckpt["step"]),
                  "cr_target": cfg.cr_target, "mode": cfg.mode}
    return finish_export(model, Path(out), arch, name or Path(out).stem, reference, provenance,
                         licence="derived from the training data and init weights: check both")

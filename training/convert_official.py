"""Import the released CR-FIQA checkpoints (``{step}backbone.pth``: iResNet keys + ``qs``) as ONNX."""

from __future__ import annotations

from pathlib import Path

import torch

from crfiqa.training.backbones import create_backbone
from crfiqa.training.checkpoint import load_state_dict_checked
from crfiqa.training.export import finish_export

ARCHS = ("iresnet50", "iresnet100")  # CR-FIQA(S) = iresnet50 32572backbone.pth, (L) = iresnet100 181952backbone.pth


def load_official(path: str | Path, arch: str):
    """The iResNet with the checkpoint's weights; any missing or unexpected key is an error listing them."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    model = create_backbone(arch)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        load_state_dict_checked(model, state, path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a CR-FIQA {arch} checkpoint: {exc}") from exc
    return model.eval()


def convert(path: str, arch: str, out: str, reference: list[str] | None = None) -> dict:
    """``crfiqa convert-official``: released checkpoint -> quality ONNX model + manifest entry."""
    model = load_official(path, arch)
    name = Path(out).stem
    return finish_export(model, Path(out), arch, name, reference, {"source": Path(path).name},
                         licence="CR-FIQA released weights: CC BY-NC 4.0 (non-commercial)")

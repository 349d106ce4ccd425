"""Import the released CR-FIQA checkpoints (``{step}backbone.pth``: iResNet keys + ``qs``) as ONNX."""

from __future__ import annotations

from pathlib import Path

import torch

from crfiqa.training.backbones import create_backbone
from crfiqa.training.export import finish_export

ARCHS = ("iresnet50", "iresnet100")  # CR-FIQA(S) = iresnet50 32572backbone.pth, (L) = iresnet100 181952backbone.pth


def load_official(path: str | Path, arch: str):
    """The iResNet with the checkpoint's weights; any missing or unexpected key is an error listing them."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = create_backbone(arch)
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}  # not always saved upstream
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} is not a CR-FIQA {arch} checkpoint: missing keys {missing}, "
                         f"unexpected keys {unexpected}, wrong shapes {wrong}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def convert(path: str, arch: str, out: str, reference: list[str] | None = None) -> dict:
    """``crfiqa convert-official``: released checkpoint -> quality ONNX model + manifest entry."""
    model = load_official(path, arch)
    name = Path(out).stem
    return finish_export(model, Path(out), arch, name, reference, {"source": Path(path).name},
                         licence="CR-FIQA released weights: CC BY-NC 4.0 (non-commercial)")

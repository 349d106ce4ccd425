"""LightQNet (Chen, Yi, Lv, IEEE SPL 2021; MIT), a published lightweight FIQA model, as an evaluation baseline.

Its input (``shared/models/fiqa/SOURCES.md``): the ArcFace-aligned 112x112 face (``service/align.py``, the
same crops every other method scores) resized whole to 96x96, RGB, (x - 128) / 128, NHWC; output
``confidence_st:0`` in (0, 1), higher = better. The files are not packaged: they are found under a
models directory's ``fiqa/`` folder (or given as a path) and verified by sha256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crfiqa.service.facemodel import FaceModel
from crfiqa.service.preprocess import InputSpec
from crfiqa.service.registry import ModelEntry, sha256_file

LIGHTQNET_INPUT = InputSpec(size=96, colour="RGB", mean=128.0, std=128.0, layout="NHWC")
SHA256 = {"dm100": "d4154063dc0fb4bf10ff43eff8b37bf5e2415025e9f02eaa650aceb642d1bc3e",
          "dm050": "e0c3a518dbaa5918714ebb7f74f1bf7a70978cfd9f28a4d29c350a849460bb4e"}
OUTPUT_NAME = "confidence_st:0"


def find_model(arg: str, dirs: list[Path]) -> Path:
    """``arg`` = ``dm100`` / ``dm050`` (searched as ``<dir>/fiqa/lightqnet-<v>.onnx``) or a path to the file."""
    variant = arg or "dm100"
    if variant not in SHA256:
        path = Path(variant)
        if not path.is_file():
            raise FileNotFoundError(f"lightqnet: {variant!r} is neither dm100/dm050 nor an .onnx file")
        return path
    for d in dirs:
        path = Path(d) / "fiqa" / f"lightqnet-{variant}.onnx"
        if path.is_file():
            digest = sha256_file(path)
            if digest != SHA256[variant]:
                raise ValueError(f"{path}: sha256 {digest} is not the published LightQNet {variant}")
            return path
    raise FileNotFoundError(f"lightqnet-{variant}.onnx not found under {[str(Path(d) / 'fiqa') for d in dirs]} "
                            "(copy shared/models/fiqa there or pass --baseline lightqnet:PATH)")


def lightqnet_quality(path: str | Path, crops: np.ndarray, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                      batch: int = 64) -> np.ndarray:
    """LightQNet confidence of aligned RGB uint8 112x112 crops [N,112,112,3] -> [N]."""
    path = Path(path)
    # The service's face-model adapter: the one preprocessing (to_blob with this spec) and chunked runs.
    entry = ModelEntry(name="lightqnet", role="quality", family="lightqnet", file=path.name, sha256=None,
                       input=LIGHTQNET_INPUT, outputs={"quality": OUTPUT_NAME})
    (out,) = FaceModel(path, entry, providers, max_batch=batch).run(crops, [OUTPUT_NAME])
    return out.reshape(len(out), -1)[:, 0].astype(np.float64) if len(out) else np.zeros(0)

"""Adapters for 112x112 face models (quality and recognition): a pure batch-in, arrays-out function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crfiqa.service.errors import InferenceError, ModelError
from crfiqa.service.preprocess import to_blob
from crfiqa.service.registry import Calibration, ModelEntry
from crfiqa.service.runtime import create_session, provider_in_use


def calibrate(raw: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Map raw quality to [0, 100]: ``100 / (1 + exp(-(raw - centre) / scale))``."""
    z = (np.asarray(raw, dtype=np.float64) - calibration.centre) / calibration.scale
    return 100.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


class FaceModel:
    """An ONNX model over aligned faces; runs batches of any size even when the graph's batch is fixed."""

    def __init__(self, path: Path, entry: ModelEntry, providers: Sequence[str], intra_op_threads: int = 0,
                 max_batch: int = 64, *, solo_threads: int = 0) -> None:
        self.entry = entry
        self.max_batch = max_batch  # larger inputs run in chunks: memory stays bounded
        self.path = path
        self.session = create_session(path, providers, intra_op_threads, solo_threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # A graph with a fixed batch dimension (SFace: 1) is fed one chunk of that size at a time.
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 0
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        """Execution provider in use."""
        return provider_in_use(self.session)

    def run(self, crops: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Normalise RGB uint8 crops [N,112,112,3] per the model's spec and return the named outputs."""
        missing = [o for o in outputs if o not in self.output_names]
        if missing:
            raise ModelError(f"{self.entry.name}: outputs {missing} not in the model ({self.output_names})",
                             code="bad_model")
        if len(crops) == 0:
            return [np.zeros((0,), dtype=np.float32) for _ in outputs]
        blob = to_blob(crops, self.entry.input)
        step = self.fixed_batch or self.max_batch
        try:
            parts = [self.session.run(outputs, {self.input_name: blob[i:i + step]}) for i in range(0, len(blob), step)]
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise InferenceError(f"{self.entry.name}: inference failed: {exc}") from exc
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


class QualityModel(FaceModel):
    """A quality model: output ``quality`` [N,1] (CR-FIQA contract), or the embedding's L2 norm."""

    def __init__(self, path: Path, entry: ModelEntry, providers: Sequence[str], intra_op_threads: int = 0,
                 max_batch: int = 64, *, solo_threads: int = 0) -> None:
        super().__init__(path, entry, providers, intra_op_threads, max_batch, solo_threads=solo_threads)
        if entry.family == "embedding_norm":
            self._output = entry.outputs.get("embedding", "embedding")
        else:
            self._output = entry.outputs.get("quality", "quality")
        if self._output not in self.output_names:
            raise ModelError(f"{path}: quality model has no output {self._output!r} (outputs: {self.output_names})",
                             code="bad_model")

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """Raw quality [N] for aligned RGB uint8 crops [N,112,112,3]."""
        (out,) = self.run(crops, [self._output])
        if self.entry.family == "embedding_norm":
            return np.linalg.norm(out.reshape(len(out), -1).astype(np.float64), axis=1)
        return out.reshape(len(out), -1)[:, 0].astype(np.float64) if len(out) else np.zeros(0)

    def score(self, raw: np.ndarray) -> np.ndarray:
        """0-100 score for raw quality values."""
        return calibrate(raw, self.entry.calibration)


class RecognitionModel(FaceModel):
    """A recognition model: raw (not normalised) embeddings [N,D]."""

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings [N,D] for aligned RGB uint8 crops."""
        (out,) = self.run(crops, [self.entry.outputs.get("embedding", self.output_names[0])])
        return out.reshape(len(out), -1).astype(np.float32)

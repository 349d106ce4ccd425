"""Training data: RecordIO (no mxnet) and aligned image folders, sharing the service's decode and preprocessing."""

from __future__ import annotations

from pathlib import Path

from crfiqa.training.data.dataset import FaceDataset
from crfiqa.training.data.folder import folder_samples
from crfiqa.training.data.recordio import RecordIO, rec_samples


def open_dataset(path: str | Path, **kwargs) -> FaceDataset:
    """A ``train.rec`` (with ``train.idx`` beside it) or a folder of ``<identity>/<image>``."""
    path = Path(path)
    if path.suffix == ".rec" or (path / "train.rec").is_file():
        rec = path if path.suffix == ".rec" else path / "train.rec"
        return FaceDataset(rec_samples(RecordIO(rec)), **kwargs)
    return FaceDataset(folder_samples(path), **kwargs)


__all__ = ["FaceDataset", "RecordIO", "open_dataset"]

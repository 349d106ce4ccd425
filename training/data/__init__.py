"""Training data: RecordIO (no mxnet) and aligned image folders, sharing the service's decode and preprocessing.

The torch parts (``FaceDataset``, ``open_dataset``) load on first use, so the RecordIO reader imports without
torch (``crfiqa curate`` reads ``.rec`` files on machines that have no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crfiqa.training.data.recordio import RecordIO, rec_samples

if TYPE_CHECKING:
    from crfiqa.training.data.dataset import FaceDataset


def open_dataset(path: str | Path, **kwargs) -> FaceDataset:
    """A ``train.rec`` (with ``train.idx`` beside it) or a folder of ``<identity>/<image>``."""
    from crfiqa.training.data.dataset import FaceDataset
    from crfiqa.training.data.folder import folder_samples

    path = Path(path)
    if path.suffix == ".rec" or (path / "train.rec").is_file():
        rec = path if path.suffix == ".rec" else path / "train.rec"
        return FaceDataset(rec_samples(RecordIO(rec)), **kwargs)
    return FaceDataset(folder_samples(path), **kwargs)


def __getattr__(name: str) -> Any:
    if name == "FaceDataset":
        from crfiqa.training.data.dataset import FaceDataset

        return FaceDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FaceDataset", "RecordIO", "open_dataset"]

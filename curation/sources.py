"""What ``crfiqa curate`` reads: a folder tree, an InsightFace RecordIO (``.rec`` + ``.idx``) or a list of paths
(``.txt``: one path per line, optionally ``path<TAB>identity``; ``.parquet``: a ``path`` column and optionally
``identity``). The driver only lists items; the bytes are read inside the Ray tasks (``load``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from crfiqa.service.errors import CrfiqaError
from crfiqa.service.imaging import is_utf8_name, list_images

if TYPE_CHECKING:
    from crfiqa.training.data.recordio import RecordIO

#: Separator between a RecordIO file and a record key in an item's name: ``train.rec#17``.
REC_SEP = "#"


@dataclass(frozen=True)
class DataSource:
    """A listed dataset: item names in a stable order, their identities (or None) and, for RecordIO, keys."""

    kind: str  # folder | recordio | list
    location: str  # what SRC named
    names: list[str]
    identities: list[str] | None = None  # None: the source has no identity labels (RecordIO: read per record)
    rec: str | None = None  # RecordIO: the .rec file
    keys: list[int] = field(default_factory=list)  # RecordIO: record keys, parallel to ``names``

    @property
    def has_identity(self) -> bool:
        """True when rows get an ``identity`` column (RecordIO labels, identity folders, listed identities)."""
        return self.kind == "recordio" or self.identities is not None

    def __len__(self) -> int:
        return len(self.names)


def open_source(src: str | Path) -> DataSource:
    """List ``src``: a RecordIO (``x.rec`` or a folder holding ``train.rec``), a ``.txt``/``.parquet`` list of
    paths, or a folder tree (its first-level folders are identities when every image lies below one)."""
    path = Path(src)
    if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").is_file()):
        return _recordio(path if path.suffix == ".rec" else path / "train.rec")
    if path.suffix.lower() in (".txt", ".lst"):
        return _text_list(path)
    if path.suffix.lower() == ".parquet":
        return _parquet_list(path)
    if path.is_dir():
        return _folder(path)
    raise CrfiqaError(f"{src}: not a folder, a .rec, a .txt or a .parquet list", code="unsupported_source")


def _folder(root: Path) -> DataSource:
    paths = list_images([root])
    if not paths:
        raise CrfiqaError(f"{root}: no images below this folder", code="empty_source")
    undecodable = [p for p in paths if not is_utf8_name(str(p))]
    if undecodable:  # the Parquet outputs name each image in UTF-8 text: say so before any work
        raise CrfiqaError(f"{len(undecodable)} file names below {root} are not valid UTF-8 (first: "
                          f"{str(undecodable[0])!r}); rename them (e.g. convmv -f latin1 -t utf8)", code="bad_name")
    rel = [p.relative_to(root).parts for p in paths]
    # <root>/<identity>/.../<image>: identities only when no image lies directly in the root.
    identities = [parts[0] for parts in rel] if all(len(parts) > 1 for parts in rel) else None
    return DataSource("folder", str(root), [str(p) for p in paths], identities)


def _recordio(rec: Path) -> DataSource:
    from crfiqa.training.data.recordio import RecordIO  # numpy only: importing it loads no torch

    try:
        keys = RecordIO(rec).image_keys()
    except (OSError, ValueError) as exc:
        raise CrfiqaError(f"{rec}: not a readable RecordIO with its .idx: {exc}", code="unreadable_source") from exc
    return DataSource("recordio", str(rec), [f"{rec}{REC_SEP}{k}" for k in keys], rec=str(rec), keys=keys)


def _resolve(base: Path, entry: str) -> str:
    """A listed path; relative entries are relative to the list file's folder."""
    p = Path(entry)
    return str(p if p.is_absolute() else base / p)


def _text_list(path: Path) -> DataSource:
    names: list[str] = []
    identities: list[str] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry, _, identity = line.rstrip("\n").partition("\t")
        names.append(_resolve(path.parent, entry.strip()))
        identities.append(identity.strip())
    if not names:
        raise CrfiqaError(f"{path}: lists no paths", code="empty_source")
    return DataSource("list", str(path), names, identities if any(identities) else None)


def _parquet_list(path: Path) -> DataSource:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "path" not in table.column_names:
        raise CrfiqaError(f"{path}: a list of paths needs a 'path' column", code="unsupported_source")
    names = [_resolve(path.parent, str(p)) for p in table.column("path").to_pylist()]
    identities = ([str(i) for i in table.column("identity").to_pylist()]
                  if "identity" in table.column_names else None)
    if not names:
        raise CrfiqaError(f"{path}: lists no paths", code="empty_source")
    return DataSource("list", str(path), names, identities)


class Loader:
    """Turns an item into what ``Pipeline.prepare`` takes, inside a Ray task: a path as is, a RecordIO record as
    (name, bytes) plus its class label. Picklable; the RecordIO reader opens its file per process."""

    def __init__(self, rec: str | None) -> None:
        self.rec = rec
        self._reader: RecordIO | None = None

    def load(self, name: str, key: int) -> tuple[str | tuple[str, bytes], str | None]:
        """(prepare's source, the record's identity or None); a broken record is a typed ``unreadable``."""
        if self.rec is None:
            return name, None
        if self._reader is None:
            from crfiqa.training.data.recordio import RecordIO

            self._reader = RecordIO(self.rec)
        try:
            record = self._reader.read(key)
        except (OSError, ValueError, KeyError) as exc:
            raise CrfiqaError(f"{name}: cannot read the record: {exc}", code="unreadable") from exc
        return (name, record.image), str(record.class_id)

    def __getstate__(self) -> dict:
        return {"rec": self.rec, "_reader": None}

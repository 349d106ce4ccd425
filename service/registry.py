"""Model manifest, lookup, sha256 verification and fetching (from a URL or a local mirror)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from crfiqa.service.errors import ModelError
from crfiqa.service.preprocess import QUALITY_INPUT, InputSpec

log = logging.getLogger(__name__)

ROLES = ("detector", "quality", "recognition")
PACKAGED_DIR = Path(str(resources.files("crfiqa.models")))
MANIFEST_PATH = PACKAGED_DIR / "manifest.toml"


@dataclass(frozen=True)
class Calibration:
    """The 0-100 mapping ``100 / (1 + exp(-(raw - centre) / scale))``."""

    centre: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class DetectorSpec:
    """How a detector wants its pixels, as the manifest declares it; None = not declared (the adapter's
    default). ``size`` is the largest network input side: images are detected at their own size up to it."""

    size: int | None = None
    colour: str | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.colour not in (None, "RGB", "BGR"):
            raise ValueError(f"colour must be RGB or BGR, not {self.colour!r}")
        if self.std is not None and self.std <= 0:
            raise ValueError("std must be positive")
        if self.size is not None and (self.size < 32 or self.size % 32):
            raise ValueError(f"detector input size must be a positive multiple of 32, not {self.size}")

    def to_dict(self) -> dict:
        """The declared fields (None where not declared)."""
        return {"size": self.size, "colour": self.colour, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class ModelEntry:
    """One manifest entry: what the file is, how to get it, how to feed it."""

    name: str
    role: str
    family: str
    file: str
    sha256: str | None
    size: int | None = None
    licence: str = "unknown"
    description: str = ""
    version: str = "1"
    sha256_verified: bool = True
    sources: tuple[dict, ...] = ()
    input: InputSpec = QUALITY_INPUT  # face models (quality, recognition)
    detector: DetectorSpec = DetectorSpec()  # detectors
    outputs: dict = field(default_factory=dict)
    calibration: Calibration = Calibration()
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly form for ``crfiqa models list`` and ``GET /v1/models``."""
        out = {
            "name": self.name, "role": self.role, "family": self.family, "version": self.version,
            "file": self.file, "sha256": self.sha256, "sha256_verified": self.sha256_verified,
            "size": self.size, "licence": self.licence, "description": self.description,
            "input": self.detector.to_dict() if self.role == "detector" else
            {"size": self.input.size, "colour": self.input.colour, "mean": self.input.mean, "std": self.input.std},
            "outputs": dict(self.outputs),
        }
        if self.role == "quality":
            out["calibration"] = {"centre": self.calibration.centre, "scale": self.calibration.scale}
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out


def _entry_from_table(name: str, table: dict) -> ModelEntry:
    """Build a ``ModelEntry`` from a manifest or sidecar table, refusing unknown roles."""
    role = table.get("role", "quality")
    if role not in ROLES:
        raise ModelError(f"model {name}: role must be one of {ROLES}, not {role!r}", code="bad_manifest")
    spec = dict(table.get("input", {}))
    try:
        if role == "detector":
            detector, input_spec = DetectorSpec(**spec), QUALITY_INPUT
        else:
            detector, input_spec = DetectorSpec(), InputSpec(**spec)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {name}: bad input spec {spec}: {exc}", code="bad_manifest") from exc
    cal = table.get("calibration", {})
    return ModelEntry(
        name=name, role=role, family=table.get("family", "crfiqa"), file=table["file"],
        sha256=table.get("sha256"), size=table.get("size"), licence=table.get("licence", "unknown"),
        description=table.get("description", ""), version=str(table.get("version", "1")),
        sha256_verified=bool(table.get("sha256_verified", True)),
        sources=tuple(table.get("sources", ())), input=input_spec, detector=detector,
        outputs=dict(table.get("outputs", {})),
        calibration=Calibration(float(cal.get("centre", 0.0)), float(cal.get("scale", 1.0))),
        provenance=dict(table.get("provenance", {})),
    )


@dataclass(frozen=True)
class Manifest:
    """All models the project knows, and the default detector and quality model."""

    entries: dict[str, ModelEntry]
    defaults: dict[str, str]

    @classmethod
    def load(cls, path: str | Path = MANIFEST_PATH) -> Manifest:
        """Parse a manifest TOML file."""
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        entries = {name: _entry_from_table(name, t) for name, t in data.get("models", {}).items()}
        return cls(entries=entries, defaults=dict(data.get("defaults", {})))

    def get(self, name: str, role: str | None = None) -> ModelEntry:
        """Look a model up by name (and role), with the list of valid names in the error."""
        entry = self.entries.get(name)
        if entry is None or (role is not None and entry.role != role):
            valid = sorted(n for n, e in self.entries.items() if role is None or e.role == role)
            raise ModelError(f"unknown {role or 'model'} {name!r}; known: {', '.join(valid)}", code="unknown_model")
        return entry

    def names(self, role: str | None = None) -> list[str]:
        """Model names, optionally of one role."""
        return [n for n, e in self.entries.items() if role is None or e.role == role]


def models_dir() -> Path:
    """Where fetched models live: ``CRFIQA_MODELS_DIR``, else the packaged ``models/`` folder."""
    return Path(os.environ.get("CRFIQA_MODELS_DIR") or PACKAGED_DIR)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, entry: ModelEntry) -> None:
    """Raise ``ModelError`` (code ``checksum_mismatch``) unless ``path`` has the entry's sha256."""
    if entry.sha256 is None:
        return
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ModelError(
            f"{entry.name}: {path} has sha256 {actual}, expected {entry.sha256}; refusing to load it "
            f"(re-fetch with `crfiqa models fetch {entry.name}`)",
            code="checksum_mismatch",
        )


def locate(entry: ModelEntry, directory: Path | None = None) -> Path:
    """Find an entry's file in ``directory`` (default ``models_dir()``); a model shipped inside the package
    (one without a download source) is also found there, so a volume mounted at CRFIQA_MODELS_DIR never
    hides the packaged default."""
    candidates = [(directory or models_dir()) / entry.file]
    if not entry.sources:
        candidates.append(PACKAGED_DIR / entry.file)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"model {entry.name} not found (looked in {', '.join(str(c) for c in dict.fromkeys(candidates))}); "
        f"get it with `crfiqa models fetch {entry.name}` (or `--from MIRROR_DIR`)",
        code="model_not_found",
    )


def resolve(name_or_path: str, role: str, manifest: Manifest | None = None,
            directory: Path | None = None) -> tuple[Path, ModelEntry]:
    """Turn a manifest name or an ``.onnx`` path into a verified file and its entry."""
    manifest = manifest or Manifest.load()
    if name_or_path.endswith(".onnx") or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist", code="model_not_found")
        entry = _sidecar_entry(path, role)
    else:
        entry = manifest.get(name_or_path, role)
        path = locate(entry, directory)
    verify_file(path, entry)
    return path, entry


def _sidecar_entry(path: Path, role: str) -> ModelEntry:
    """Spec of a model given as a path: ``<file>.toml`` beside it if present, else the CR-FIQA contract."""
    sidecar = path.with_suffix(".toml")
    if sidecar.is_file():
        with open(sidecar, "rb") as fh:
            table = tomllib.load(fh)
        table = table.get("model", table)
        table.setdefault("role", role)
        table["file"] = path.name
        return _entry_from_table(table.pop("name", path.stem), table)
    return ModelEntry(name=path.stem, role=role, family="crfiqa", file=path.name, sha256=None,
                      description=f"local file {path}")


def fetch(entry: ModelEntry, directory: Path | None = None, mirror: Path | None = None,
          sha256: str | None = None, progress: bool = True) -> Path:
    """Put a verified copy of ``entry`` into ``directory``: from ``mirror`` if given, else its URL."""
    directory = directory or models_dir()
    target = directory / entry.file
    if sha256 and entry.sha256 and sha256.lower() != entry.sha256:
        # Loading verifies against the manifest: a file fetched by another hash could never be used.
        raise ModelError(f"{entry.name}: the manifest pins sha256 {entry.sha256}; --sha256 {sha256} differs, and "
                         "a file with it would be refused at load (to trust another file, edit the manifest or give "
                         "the model as an .onnx path)", code="checksum_mismatch")
    expected = (sha256 or "").lower() or entry.sha256
    # Already here, or (a model without a download source) shipped inside the package.
    for present in (target, *([] if entry.sources else [PACKAGED_DIR / entry.file])):
        if present.is_file() and (expected is None or sha256_file(present) == expected):
            return present
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if mirror is not None:
                source = Path(mirror) / entry.file
                if not source.is_file():
                    raise ModelError(f"{entry.name}: {source} not in mirror {mirror}", code="model_not_found")
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                _download(entry, out, progress)
        actual = sha256_file(tmp)
        if expected is not None and actual != expected:
            raise ModelError(f"{entry.name}: fetched file has sha256 {actual}, expected {expected}",
                             code="checksum_mismatch")
        os.replace(tmp, target)  # atomic: a reader never sees a half-written model
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _download(entry: ModelEntry, out: io.BufferedIOBase, progress: bool) -> None:
    """Stream the first source that works into ``out`` (extracting an archive member if named)."""
    if not entry.sources:
        raise ModelError(f"{entry.name} declares no source URL; use --from MIRROR_DIR", code="no_source")
    errors = []
    for source in entry.sources:
        try:
            member = source.get("archive_member")
            if member:
                with tempfile.TemporaryFile() as archive:
                    _stream(source["url"], archive, progress)
                    archive.seek(0)
                    with zipfile.ZipFile(archive) as zf:
                        names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
                        if not names:
                            raise ModelError(f"{member} not in {source['url']}", code="model_not_found")
                        with zf.open(names[0]) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
            else:
                _stream(source["url"], out, progress)
            return
        except (OSError, zipfile.BadZipFile, ModelError) as exc:
            errors.append(f"{source['url']}: {exc}")
            out.seek(0)
            out.truncate()
    raise ModelError(f"{entry.name}: every source failed: " + "; ".join(errors), code="fetch_failed")


def _stream(url: str, out, progress: bool) -> None:
    """Download ``url`` into ``out`` with a tqdm progress bar on stderr."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response:  # URLs come from the manifest
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=not progress, file=sys.stderr) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))

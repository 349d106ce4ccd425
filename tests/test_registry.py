"""Manifest, lookup, sha256 verification and fetching from a mirror."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crfiqa.service import registry
from crfiqa.service.errors import ModelError
from crfiqa.service.pipeline import Pipeline, PipelineSettings
from tests.helpers import SHARED_MODELS

REQUIRED = {"scrfd_500m", "scrfd_2.5g", "scrfd_10g", "yunet_2023mar", "w600k_mbf", "sface_2021dec"}


def test_manifest_declares_required_models() -> None:
    m = registry.Manifest.load()
    assert set(m.entries) >= REQUIRED
    for e in m.entries.values():
        assert e.role in registry.ROLES and len(e.sha256 or "") == 64 and e.licence
        assert e.sources or (registry.PACKAGED_DIR / e.file).is_file(), f"{e.name}: no source and not packaged"
    assert not m.get("scrfd_10g").sha256_verified
    assert m.get(m.defaults["detector"]).role == "detector"
    assert m.get(m.defaults["quality"]).role == "quality"


def test_manifest_hashes_match_shared_sums() -> None:
    sums = dict(reversed(line.split()) for line in (SHARED_MODELS / "SHA256SUMS").read_text().splitlines())
    m = registry.Manifest.load()
    for name in REQUIRED - {"scrfd_10g"}:
        e = m.get(name)
        assert sums[e.file.lstrip("./")] == e.sha256 if e.file in sums else sums["./" + e.file] == e.sha256


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ModelError) as e:
        registry.Manifest.load().get("scrfd_1t", "detector")
    assert e.value.code == "unknown_model" and "scrfd_500m" in e.value.message


def test_fetch_from_mirror_then_verify(tmp_path: Path) -> None:
    m = registry.Manifest.load()
    path = registry.fetch(m.get("yunet_2023mar"), tmp_path, mirror=SHARED_MODELS, progress=False)
    assert path == tmp_path / "det" / "yunet_2023mar.onnx"
    assert registry.sha256_file(path) == m.get("yunet_2023mar").sha256
    assert not list(path.parent.glob("*.part"))
    registry.resolve("yunet_2023mar", "detector", m, tmp_path)


def test_fetch_refuses_wrong_hash_and_leaves_nothing(tmp_path: Path) -> None:
    """--sha256 other than the manifest's is refused before any copy (loading checks the manifest's, so the
    file could never be used); the manifest's own, in capitals, confirms the download."""
    entry = registry.Manifest.load().get("yunet_2023mar")
    with pytest.raises(ModelError) as e:
        registry.fetch(entry, tmp_path, mirror=SHARED_MODELS, sha256="0" * 64, progress=False)
    assert e.value.code == "checksum_mismatch" and "pins" in e.value.message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    path = registry.fetch(entry, tmp_path, mirror=SHARED_MODELS, sha256=(entry.sha256 or "").upper(), progress=False)
    registry.resolve("yunet_2023mar", "detector", directory=tmp_path)
    assert path.is_file()


def test_mismatching_file_is_never_loaded(tmp_path: Path) -> None:
    target = tmp_path / "det" / "scrfd_500m.onnx"
    target.parent.mkdir()
    shutil.copy(SHARED_MODELS / "det" / "scrfd_500m.onnx", target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    pipe = Pipeline(PipelineSettings(models_dir=tmp_path, providers=("CPUExecutionProvider",)))
    with pytest.raises(ModelError) as e:
        _ = pipe.detector
    assert e.value.code == "checksum_mismatch" and "scrfd_500m" in e.value.message


def test_missing_model_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        registry.resolve("scrfd_2.5g", "detector", directory=tmp_path)
    assert e.value.code == "model_not_found" and "crfiqa models fetch scrfd_2.5g" in e.value.message


def test_onnx_path_with_sidecar(tmp_path: Path, channel_model: Path) -> None:
    model = tmp_path / "mine.onnx"
    shutil.copy(channel_model, model)
    model.with_suffix(".toml").write_text(
        '[model]\nname = "mine"\nversion = "7"\ncalibration = { centre = 0.5, scale = 0.1 }\n')
    path, entry = registry.resolve(str(model), "quality")
    assert path == model and entry.name == "mine" and entry.version == "7" and entry.calibration.centre == 0.5

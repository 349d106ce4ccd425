"""Aligned image folders: ``<root>/<identity>/<image>``; classes are the sorted identity names."""

from __future__ import annotations

from pathlib import Path

from crfiqa.service.imaging import IMAGE_EXTENSIONS


def folder_samples(root: str | Path) -> list[tuple[object, int]]:
    """(path, class) pairs; identities are numbered in sorted order."""
    root = Path(root)
    identities = sorted(p for p in root.iterdir() if p.is_dir())
    if not identities:
        raise ValueError(f"{root}: no identity folders (<root>/<identity>/<image>)")
    samples = []
    for label, folder in enumerate(identities):
        samples += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return samples


def identity_names(root: str | Path) -> list[str]:
    """Identity folder names in class order."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())

"""Packaging that cannot break silently: every package folder is in the wheel, the wheel works outside the
checkout, the build is warning-free, and each module has exactly one import name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, SAMPLES, SHARED_MODELS

sys.path.insert(0, str(REPO))
from setup import ROOTS, packages

sys.path.remove(str(REPO))


def _package_folders() -> dict[str, Path]:
    """Every folder with an ``__init__.py`` under the top-level roots, by its import name."""
    found = {}
    for name, folder in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_every_package_folder_is_packaged() -> None:
    assert set(_package_folders()) == set(packages())


def test_a_new_subpackage_is_found_without_editing_anything(tmp_path: Path) -> None:
    """The generated list follows the tree: a folder added under service/ appears in it."""
    new = REPO / "service" / "zz_probe_pkg"
    new.mkdir()
    try:
        (new / "__init__.py").write_text("")
        assert "crfiqa.service.zz_probe_pkg" in packages()
    finally:
        (new / "__init__.py").unlink()
        new.rmdir()


def test_one_import_name_per_module() -> None:
    """From the repo root the folders are importable as bare names; that second copy is refused."""
    r = subprocess.run([sys.executable, "-c", "import service"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "import crfiqa.service, not service" in r.stderr


def test_lazy_top_level_import() -> None:
    """``crfiqa.evaluation.metrics`` needs NumPy only: importing it pulls no OpenCV, ONNX Runtime or torch."""
    code = ("import sys, crfiqa.evaluation.metrics; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cv2', 'onnxruntime', 'torch', 'fastapi', 'PIL'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel (no warnings), install it into a fresh venv, import every module, score t1.jpg."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "Warning" not in build.stderr and "warning:" not in build.stderr.lower(), build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("crfiqa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in packages():
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, pkg
    assert "crfiqa/models/manifest.toml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # The dependencies come from this environment's site-packages (added as a plain path: its .pth files,
    # the editable install's finder among them, are not run), the package itself only from the wheel.
    site = Path(sysconfig.get_paths()["purelib"])
    fresh_site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                              text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)
    (fresh_site / "zz_deps.pth").write_text(f"{site}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
                     if n.endswith(".py") and n.startswith("crfiqa/"))
    code = ("import importlib, crfiqa; "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "print(crfiqa.__file__)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(fresh_site) in r.stdout, r.stdout  # the wheel's copy, not the checkout's
    score = subprocess.run([str(venv / "bin" / "crfiqa"), "score", "--quiet", str(SAMPLES / "t1.jpg")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**env, "CRFIQA_MODELS_DIR": str(SHARED_MODELS)})
    assert score.returncode == 0, score.stderr[-3000:]
    assert score.stdout.count('"quality"') == 6

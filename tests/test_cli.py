"""The ``crfiqa`` command as users run it: a real subprocess on real files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.helpers import SAMPLES, SHARED_MODELS

ENV = {**os.environ, "CRFIQA_MODELS_DIR": str(SHARED_MODELS), "CRFIQA_PROVIDERS": "CPUExecutionProvider"}


def crfiqa(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crfiqa.cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("detector", ["scrfd_500m", "yunet_2023mar"])
def test_detect_t1(detector: str) -> None:
    r = crfiqa("detect", str(SAMPLES / "t1.jpg"), "--detector", detector)
    assert r.returncode == 0, r.stderr
    (res,) = lines(r.stdout)
    assert res["status"] == "ok" and len(res["faces"]) == 6
    face = res["faces"][0]
    assert set(face) == {"bbox", "det_score", "landmarks"} and len(face["landmarks"]) == 5


def test_align_writes_crops(tmp_path: Path) -> None:
    r = crfiqa("align", str(SAMPLES / "t1.jpg"), "--out", str(tmp_path), "--max-faces", "3")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t1_0.png", "t1_1.png", "t1_2.png"]
    assert cv2.imread(str(tmp_path / "t1_0.png")).shape == (112, 112, 3)


def test_score_aligned_and_detected_agree_on_tom_hanks() -> None:
    a = lines(crfiqa("score", "--aligned", str(SAMPLES / "Tom_Hanks_54745.png")).stdout)[0]
    d = lines(crfiqa("score", str(SAMPLES / "Tom_Hanks_54745.png")).stdout)[0]
    assert len(a["faces"]) == 1 and len(d["faces"]) == 1
    qa, qd = a["faces"][0]["quality"], d["faces"][0]["quality"]
    assert 0 <= qa["score"] <= 100 and abs(qa["raw"] - qd["raw"]) < 0.1 * abs(qa["raw"])


def test_score_directory_to_csv_with_broken_file(tmp_path: Path, channel_model: Path) -> None:
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(SAMPLES / "t1.jpg", data / "t1.jpg")
    (data / "broken.jpg").write_bytes((SAMPLES / "t1.jpg").read_bytes()[:5000])
    out = tmp_path / "scores.csv"
    r = crfiqa("score", str(data), "--model", str(channel_model), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    broken = [row for row in rows if row["path"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["status"] == "error" and broken[0]["error_code"] == "corrupt_image"
    faces = [row for row in rows if row["path"].endswith("t1.jpg")]
    assert [int(row["face"]) for row in faces] == list(range(6))
    assert all(row["quality_raw"] and 0 <= float(row["quality_score"]) <= 100 for row in faces)


def test_score_jsonl_out(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    r = crfiqa("score", str(SAMPLES / "t1.jpg"), "--out", str(out), "--max-faces", "2")
    assert r.returncode == 0, r.stderr
    (res,) = lines(out.read_text())
    assert len(res["faces"]) == 2 and all("quality" in f for f in res["faces"])


def test_exit_code_nonzero_only_when_nothing_processed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    r = crfiqa("detect", str(bad))
    assert r.returncode == 1
    assert lines(r.stdout)[0]["error"]["code"] == "unsupported_format"
    assert crfiqa("detect", str(bad), str(SAMPLES / "t1.jpg")).returncode == 0
    assert crfiqa("detect").returncode == 2  # invocation error


def test_missing_model_fails_clearly(tmp_path: Path) -> None:
    r = crfiqa("detect", str(SAMPLES / "t1.jpg"), env={**ENV, "CRFIQA_MODELS_DIR": str(tmp_path)})
    assert r.returncode == 1 and "model_not_found" in r.stderr and "crfiqa models fetch" in r.stderr


def test_models_fetch_from_mirror_and_verify(tmp_path: Path) -> None:
    env = {**ENV, "CRFIQA_MODELS_DIR": str(tmp_path / "m"), "CRFIQA_MODEL_MIRROR": str(SHARED_MODELS)}
    r = crfiqa("models", "fetch", "scrfd_500m", "yunet_2023mar", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "det" / "scrfd_500m.onnx").is_file()
    v = crfiqa("models", "verify", "scrfd_500m", "yunet_2023mar", env=env)
    assert v.returncode == 0 and v.stdout.count(" ok") == 2
    assert crfiqa("models", "verify", "scrfd_2.5g", env=env).returncode == 1


def test_score_never_imports_torch() -> None:
    code = ("import sys; from crfiqa.cli import main; "
            f"main(['score', '--quiet', {str(SAMPLES / 't1.jpg')!r}]); "
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.stderr.endswith("NOTORCH"), r.stderr[-500:]

"""The ``crfiqa`` command as users run it: a real subprocess on real files."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from crfiqa.service.align import ARCFACE_TEMPLATE
from tests.helpers import REPO, SAMPLES, SHARED_MODELS, expected_channel_quality, hostile_images

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


def test_align_keeps_same_named_inputs_apart(tmp_path: Path) -> None:
    """a/img.jpg and b/img.png (and a/img.png beside a/img.jpg, and a/img.jpg.png) never overwrite each other's
    crops; a file named twice is aligned once."""
    for rel in ("a/img.jpg", "b/img.png", "a/img.png", "a/img.jpg.png"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / "t1.jpg", tmp_path / "in" / rel)
    out = tmp_path / "out"
    r = crfiqa("align", str(tmp_path / "in" / "a" / "img.jpg"), str(tmp_path / "in" / "b" / "img.png"),
               str(tmp_path / "in" / "a" / "img.png"), str(tmp_path / "in" / "a" / "img.jpg.png"),
               str(tmp_path / "in" / "a" / ".." / "a" / "img.jpg"), "--out", str(out), "--max-faces", "1")
    assert r.returncode == 0, r.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["a/img.jpg_0.png", "a/img.jpg~2_0.png", "a/img.png_0.png", "b/img_0.png"]
    assert [res["crops"] for res in lines(r.stdout)] == [
        [str(out / w)] for w in ("a/img.jpg_0.png", "b/img_0.png", "a/img.png_0.png", "a/img.jpg~2_0.png")]


def _calibrated(raw: float) -> float:
    """The 0-100 score of the default model, computed here from the manifest's numbers."""
    manifest = tomllib.loads((REPO / "models" / "manifest.toml").read_text())
    cal = manifest["models"][manifest["defaults"]["quality"]]["calibration"]
    return 100.0 / (1.0 + math.exp(-(raw - cal["centre"]) / cal["scale"]))


def test_score_aligned_and_detected_agree_on_tom_hanks() -> None:
    """``--aligned`` scores the crop's own pixels; detection on the crop finds its landmarks near the template."""
    path = SAMPLES / "Tom_Hanks_54745.png"
    a = lines(crfiqa("score", "--aligned", str(path)).stdout)[0]
    d = lines(crfiqa("score", str(path)).stdout)[0]
    assert len(a["faces"]) == 1 and len(d["faces"]) == 1
    qa, qd = a["faces"][0]["quality"], d["faces"][0]["quality"]
    assert qa["score"] == pytest.approx(_calibrated(qa["raw"]), abs=2e-3)
    assert qd["score"] == pytest.approx(_calibrated(qd["raw"]), abs=2e-3)
    # The aligned path is the default model on exactly these pixels, normalised here by hand (RGB, /127.5).
    import onnxruntime as ort

    manifest = tomllib.loads((REPO / "models" / "manifest.toml").read_text())
    model = REPO / "models" / manifest["models"][manifest["defaults"]["quality"]]["file"]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float32)
    blob = ((rgb - 127.5) / 127.5).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (raw,) = session.run(["quality"], {"input": blob})[0][0]
    assert qa["raw"] == pytest.approx(float(raw), abs=2e-6)
    # Detection on an aligned crop lands its landmarks within a few pixels of the template (a photo's
    # are tens of pixels off), so both paths see nearly the same face.
    landmarks = np.array(d["faces"][0]["landmarks"])
    assert np.abs(landmarks - ARCFACE_TEMPLATE).max() < 8.0, landmarks


def test_aligned_refuses_a_photo_unless_resizing_is_asked_for() -> None:
    (res,) = lines(crfiqa("score", "--aligned", str(SAMPLES / "t1.jpg")).stdout)
    assert res["status"] == "error" and res["error"]["code"] == "not_aligned" and res["faces"] == []
    (res,) = lines(crfiqa("score", "--aligned", "--resize-aligned", str(SAMPLES / "t1.jpg")).stdout)
    assert res["status"] == "ok" and len(res["faces"]) == 1


def test_cpu_run_prints_no_provider_warning_unless_a_provider_was_asked_for() -> None:
    env = {k: v for k, v in ENV.items() if k != "CRFIQA_PROVIDERS"}
    quiet = crfiqa("--log-level", "INFO", "score", "--quiet", str(SAMPLES / "t1.jpg"), env=env)
    assert quiet.returncode == 0 and "not available" not in quiet.stderr, quiet.stderr
    asked = crfiqa("score", "--quiet", "--providers", "CUDAExecutionProvider,CPUExecutionProvider",
                   str(SAMPLES / "t1.jpg"), env=env)
    assert asked.returncode == 0 and "CUDAExecutionProvider" in asked.stderr and "not available" in asked.stderr


def test_missing_onnxruntime_is_one_sentence() -> None:
    """An install without an ONNX Runtime extra: a clear sentence and exit 1, no traceback."""
    code = ("import sys; sys.modules['onnxruntime'] = None; from crfiqa.cli import main; "
            f"sys.exit(main(['score', '--quiet', {str(SAMPLES / 't1.jpg')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "install crfiqa[cpu] or crfiqa[gpu]" in r.stderr


def test_score_directory_to_csv_with_broken_file(tmp_path: Path, channel_model: Path) -> None:
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(SAMPLES / "t1.jpg", data / "t1.jpg")
    (data / "broken.jpg").write_bytes((SAMPLES / "t1.jpg").read_bytes()[:5000])
    for k, hostile in enumerate(hostile_images().values()):  # Pillow raises untyped errors on these
        (data / f"hostile{k}.tif").write_bytes(hostile)
    out = tmp_path / "scores.csv"
    r = crfiqa("score", str(data), "--model", str(channel_model), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    broken = [row for row in rows if row["path"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["status"] == "error" and broken[0]["error_code"] == "corrupt_image"
    hostile = [row for row in rows if "hostile" in row["path"]]
    assert len(hostile) == 2 and {row["error_code"] for row in hostile} <= {"unsupported_format", "corrupt_image"}
    faces = [row for row in rows if row["path"].endswith("t1.jpg")]
    assert [int(row["face"]) for row in faces] == list(range(6))
    # The channel model's output is known in closed form from the crop: check each raw against the crops
    # `crfiqa align` writes (lossless PNG), and the score against the model's (default) calibration.
    crops = tmp_path / "crops"
    assert crfiqa("align", str(data / "t1.jpg"), "--out", str(crops)).returncode == 0
    for k, row in enumerate(faces):
        crop = cv2.cvtColor(cv2.imread(str(crops / f"t1_{k}.png")), cv2.COLOR_BGR2RGB)
        assert float(row["quality_raw"]) == pytest.approx(expected_channel_quality(crop), abs=2e-6)
        assert float(row["quality_score"]) == pytest.approx(100 / (1 + math.exp(-float(row["quality_raw"]))), abs=2e-3)


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


def test_broken_model_file_fails_typed_without_a_traceback(tmp_path: Path) -> None:
    """A file that is not an ONNX model given as --model: the typed ``bad_model`` naming it, not ONNX
    Runtime's InvalidProtobuf traceback."""
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model\n")
    r = crfiqa("score", str(SAMPLES / "t1.jpg"), "--model", str(broken))
    assert r.returncode == 1 and "bad_model" in r.stderr and str(broken) in r.stderr
    assert "Traceback" not in r.stderr


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


def test_help_imports_no_heavy_module() -> None:
    """``crfiqa --help`` builds every subcommand's flags without importing torch, uvicorn or ONNX Runtime."""
    code = ("import sys; from crfiqa.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'uvicorn', 'onnxruntime', 'ray', 'fastapi'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_file_names_that_are_not_utf8_are_read_and_written(tmp_path: Path) -> None:
    """A Latin-1 file name beside a UTF-8 one: align, --annotate and CSV all handle both (OpenCV's imwrite
    crashed the process on such a name, and the CSV writer stopped at it, losing every later row)."""
    src = tmp_path / "in"
    src.mkdir()
    bad = os.fsdecode(b"caf\xe9.jpg")
    for name in ("good.jpg", bad):
        shutil.copy(SAMPLES / "t1.jpg", src / name)
    r = crfiqa("align", str(src), "--out", str(tmp_path / "crops"), "--max-faces", "1")
    assert r.returncode == 0, r.stderr
    assert [x["status"] for x in lines(r.stdout)] == ["ok", "ok"]
    assert sorted(os.fsencode(p.name) for p in (tmp_path / "crops").iterdir()) == [b"caf\xe9_0.png", b"good_0.png"]
    r = crfiqa("score", str(src), "--out", str(tmp_path / "s.csv"), "--annotate", str(tmp_path / "ann"), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "s.csv").read_bytes().splitlines()[1:]
    assert len(rows) == 12 and sum(b"caf\xe9.jpg" in row for row in rows) == 6  # six faces each
    assert sorted(os.fsencode(p.name) for p in (tmp_path / "ann").iterdir()) == [b"caf\xe9.jpg", b"good.jpg"]


def test_outputs_never_replace_inputs_and_links_keep_their_names(tmp_path: Path) -> None:
    """--annotate into the input folder is refused before anything is written; a symlinked identity folder's
    crops are named after the link (bob/), not its target."""
    src = tmp_path / "src"
    (src / "ann").mkdir(parents=True)
    (tmp_path / "store" / "8f3a").mkdir(parents=True)
    shutil.copy(SAMPLES / "t1.jpg", src / "ann" / "1.jpg")
    shutil.copy(SAMPLES / "t1.jpg", tmp_path / "store" / "8f3a" / "1.jpg")
    (src / "bob").symlink_to(tmp_path / "store" / "8f3a", target_is_directory=True)
    before = (src / "ann" / "1.jpg").read_bytes()
    r = crfiqa("score", str(src), "--annotate", str(src), "--quiet")
    assert r.returncode == 1 and "bad_argument" in r.stderr and "overwritten" in r.stderr
    assert (src / "ann" / "1.jpg").read_bytes() == before
    r = crfiqa("align", str(src), "--out", str(tmp_path / "out"), "--max-faces", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "ann/1_0.png", "bob/1_0.png"]
    # The sixth face's crop of a.jpg would be a_5.png, an input beside it: that image is an error, a_5.png stays.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(SAMPLES / "t1.jpg", mixed / "a.jpg")
    shutil.copy(SAMPLES / "Tom_Hanks_54745.png", mixed / "a_5.png")
    kept = (mixed / "a_5.png").read_bytes()
    r = crfiqa("align", str(mixed / "a.jpg"), str(mixed / "a_5.png"), "--out", str(mixed))
    out = {Path(x["path"]).name: x for x in lines(r.stdout)}
    assert out["a.jpg"]["status"] == "error" and "overwritten" in out["a.jpg"]["error"]["message"]
    assert (mixed / "a_5.png").read_bytes() == kept
    r = crfiqa("score", str(mixed / "a_5.png"), "--out", str(mixed / "a_5.png"))
    assert r.returncode == 1 and "bad_argument" in r.stderr and (mixed / "a_5.png").read_bytes() == kept


def test_no_images_and_out_of_range_flags_are_clear_errors(tmp_path: Path) -> None:
    """An input that holds no image is an error, not a silent success; detection flags are range-checked
    like their CRFIQA_* variables, and a bad variable is one line, not a traceback."""
    (tmp_path / "empty").mkdir()
    for command in ("score", "best"):
        r = crfiqa(command, str(tmp_path / "empty"))
        assert r.returncode == 1 and "no_images" in r.stderr, (command, r.stderr)
    for flags, field in ((["--det-threshold", "-1"], "--det-threshold"), (["--det-size", "8"], "--det-size")):
        r = crfiqa("detect", str(SAMPLES / "t1.jpg"), *flags)
        assert r.returncode == 1 and "bad_argument" in r.stderr and field in r.stderr and not r.stdout, r.stderr
    for flags in (["--max-faces", "-1"], ["--min-face-size", "nan"]):
        r = crfiqa("detect", str(SAMPLES / "t1.jpg"), *flags)
        assert r.returncode == 2 and "must be >= 0" in r.stderr, r.stderr
    r = crfiqa("detect", str(SAMPLES / "t1.jpg"), env={**ENV, "CRFIQA_DET_SIZE": "10"})
    assert r.returncode == 1 and "crfiqa: error: bad_argument" in r.stderr and "Traceback" not in r.stderr
    r = crfiqa("detect", str(SAMPLES / "t1.jpg"), env={**ENV, "CRFIQA_BODY_MIN_RATE": "-5"})
    assert r.returncode == 1 and "CRFIQA_BODY_MIN_RATE" in r.stderr and "--body-min-rate" not in r.stderr

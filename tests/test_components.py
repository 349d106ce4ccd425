"""Quality components: each one's response to a controlled change of a real face photo, the pose maths on
synthetic projections, the pipeline/CLI plumbing (JSON, CSV, --annotate)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crfiqa.service.components import COMPONENT_NAMES, FACE_3D, head_pose
from crfiqa.service.imaging import DecodedImage, read_image
from crfiqa.service.pipeline import Options, Pipeline
from crfiqa.service.results import Component
from tests.helpers import LFW, SAMPLES, SHARED_MODELS

IMAGES = LFW / "images"
#: Near-frontal LFW faces with an inter-eye distance over 40 px (measured; asserted again below).
FRONTAL = ["AJ_Lamas/AJ_Lamas_0001.jpg", "Anne_Krueger/Anne_Krueger_0001.jpg",
           "Cristina_Torrens_Valero/Cristina_Torrens_Valero_0001.jpg", "Eliane_Karp/Eliane_Karp_0002.jpg",
           "George_Robertson/George_Robertson_0015.jpg", "Ian_Thorpe/Ian_Thorpe_0002.jpg",
           "Jennifer_Capriati/Jennifer_Capriati_0003.jpg", "Jose_Dirceu/Jose_Dirceu_0001.jpg",
           "Leonid_Kuchma/Leonid_Kuchma_0003.jpg", "Nastassia_Kinski/Nastassia_Kinski_0002.jpg"]
#: LFW faces turned by more than 10 degrees, found by measuring yaw over the first 300 dev images.
TURNED = ["Adam_Kennedy/Adam_Kennedy_0001.jpg", "Ann_Veneman/Ann_Veneman_0005.jpg",
          "Anne_McLellan/Anne_McLellan_0002.jpg", "Ben_Cohen/Ben_Cohen_0001.jpg",
          "Calista_Flockhart/Calista_Flockhart_0006.jpg", "Christian_Longo/Christian_Longo_0003.jpg",
          "Colleen_OClair/Colleen_OClair_0001.jpg", "Carla_Del_Ponte/Carla_Del_Ponte_0005.jpg"]
ENV = {**os.environ, "CRFIQA_MODELS_DIR": str(SHARED_MODELS), "CRFIQA_PROVIDERS": "CPUExecutionProvider"}


def rgb_of(rel: str) -> np.ndarray:
    """An LFW image, decoded by the project's decoder."""
    return read_image(IMAGES / rel).rgb


def comps(pipe: Pipeline, rgb: np.ndarray) -> dict[str, Component]:
    """The components of the face nearest the centre of an RGB image."""
    p = pipe.prepare(("x", DecodedImage(np.ascontiguousarray(rgb), "x")),
                     Options(components=True, select="center"))
    assert p.error is None and len(p.components) == 1, (p.error, len(p.detections))
    return p.components[0]


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# -- pose maths -------------------------------------------------------------------------------------------------

def _project(yaw: float, pitch: float, roll: float, scale: float = 2.0) -> np.ndarray:
    """FACE_3D seen by a scaled-orthographic camera after R = Rz(roll) Ry(yaw) Rx(pitch) (documented signs)."""
    y, p, r = (math.radians(v) for v in (-yaw, -pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    pts = (rz @ ry @ rx @ FACE_3D.T).T
    return scale * pts[:, :2] + [320.0, 240.0]


@pytest.mark.parametrize("angles", [(0, 0, 0), (30, 0, 0), (-25, 10, 5), (10, -20, -15), (45, 15, 30)])
def test_head_pose_recovers_known_rotations(angles: tuple[float, float, float]) -> None:
    got = head_pose(_project(*angles))
    assert np.allclose(got, angles, atol=0.01), (got, angles)


def test_head_pose_of_a_mirrored_face_negates_yaw_and_roll() -> None:
    pts = _project(25, 10, 8)
    mirrored = pts[[1, 0, 2, 4, 3]] * [-1, 1] + [640, 0]  # a detector names the image-left eye first again
    assert np.allclose(head_pose(mirrored), (-25, 10, -8), atol=0.01)


def test_head_pose_signs_on_the_image() -> None:
    """yaw > 0: the nose moves to the image's right; pitch > 0: the nose moves up; roll > 0: clockwise."""
    front = _project(0, 0, 0)

    def nose_offset(p: np.ndarray) -> np.ndarray:
        return p[2] - p[[0, 1, 3, 4]].mean(axis=0)  # the nose tip against the other four points

    assert nose_offset(_project(20, 0, 0))[0] > nose_offset(front)[0] + 5
    assert nose_offset(_project(0, 20, 0))[1] < nose_offset(front)[1] - 5
    assert _project(0, 0, 20)[1, 1] > front[1, 1] + 5  # the image-right eye goes down: clockwise, y down


# -- responses on real faces ------------------------------------------------------------------------------------

def test_blur_lowers_sharpness(pipeline: Pipeline) -> None:
    for rel in FRONTAL[:5]:
        rgb = rgb_of(rel)
        a, b = comps(pipeline, rgb), comps(pipeline, cv2.GaussianBlur(rgb, (0, 0), 2.0))
        assert b["sharpness"].value < a["sharpness"].value - 0.08, rel
        assert b["sharpness"].score is not None and a["sharpness"].score is not None
        assert b["sharpness"].score < a["sharpness"].score, rel


def test_gamma_darkening_lowers_luminance_and_raises_under_exposure(pipeline: Pipeline) -> None:
    for rel in FRONTAL[:5]:
        rgb = rgb_of(rel)
        dark = (255.0 * (rgb / 255.0) ** 2.5).astype(np.uint8)
        a, b = comps(pipeline, rgb), comps(pipeline, dark)
        assert b["luminance_mean"].value < a["luminance_mean"].value - 0.15, rel
        assert b["under_exposure"].value > a["under_exposure"].value + 0.02, rel
        assert b["under_exposure"].score < a["under_exposure"].score, rel


def test_brightening_raises_over_exposure(pipeline: Pipeline) -> None:
    rgb = rgb_of(FRONTAL[0])
    bright = np.clip(rgb.astype(np.float64) * 2.2, 0, 255).astype(np.uint8)
    a, b = comps(pipeline, rgb), comps(pipeline, bright)
    assert a["over_exposure"].value < 0.01 and b["over_exposure"].value > 0.1
    assert b["luminance_mean"].value > a["luminance_mean"].value


def test_rotation_by_20_degrees_changes_roll_by_20(pipeline: Pipeline) -> None:
    """OpenCV's +20 deg is counter-clockwise, so roll (clockwise > 0) drops by 20. Per face the detector's
    landmarks move by 1-5 px under rotation (measured), so the bound is on the median, and looser per face."""
    deltas = []
    for rel in FRONTAL:
        rgb = rgb_of(rel)
        h, w = rgb.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)
        rotated = cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
        deltas.append(comps(pipeline, rotated)["roll"].value - comps(pipeline, rgb)["roll"].value)
    assert abs(float(np.median(deltas)) + 20) <= 1.5, deltas
    assert all(abs(abs(d) - 20) <= 5 for d in deltas), deltas
    assert sum(abs(abs(d) - 20) <= 3 for d in deltas) >= len(deltas) // 2, deltas


def test_downscaling_by_2_halves_inter_eye_distance(pipeline: Pipeline) -> None:
    for rel in FRONTAL:
        rgb = rgb_of(rel)
        h, w = rgb.shape[:2]
        a = comps(pipeline, rgb)
        assert a["inter_eye_distance"].value > 40 and abs(a["yaw"].value) < 20, rel  # the set's definition
        b = comps(pipeline, cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
        ratio = b["inter_eye_distance"].value / a["inter_eye_distance"].value
        assert abs(ratio - 0.5) <= 0.025, (rel, ratio)
        assert b["inter_eye_distance"].score < a["inter_eye_distance"].score


def test_horizontal_flip_flips_yaw(pipeline: Pipeline) -> None:
    for rel in TURNED:
        rgb = rgb_of(rel)
        a, b = comps(pipeline, rgb), comps(pipeline, rgb[:, ::-1])
        assert abs(a["yaw"].value) > 10, (rel, a["yaw"].value)  # the precondition, measured again
        assert np.sign(b["yaw"].value) == -np.sign(a["yaw"].value) and abs(b["yaw"].value) > 5, rel
        assert abs(b["yaw"].value + a["yaw"].value) < 8, (rel, a["yaw"].value, b["yaw"].value)


def test_noise_raises_noise(pipeline: Pipeline) -> None:
    rng = np.random.default_rng(0)
    for rel in FRONTAL[:3]:
        rgb = rgb_of(rel)
        noisy = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
        a, b = comps(pipeline, rgb), comps(pipeline, noisy)
        assert b["noise"].value > a["noise"].value + 4, rel
        assert b["noise"].score < a["noise"].score


def test_strong_jpeg_raises_compression(pipeline: Pipeline) -> None:
    for rel in FRONTAL[:3]:
        rgb = rgb_of(rel)
        a, b = comps(pipeline, rgb), comps(pipeline, jpeg(rgb, 10))
        assert b["compression"].value > a["compression"].value + 0.4, rel
        assert b["compression"].score < a["compression"].score


def test_lower_contrast_lowers_contrast_and_dynamic_range(pipeline: Pipeline) -> None:
    rgb = rgb_of(FRONTAL[1])
    flat = (128 + (rgb.astype(np.float64) - 128) * 0.4).astype(np.uint8)
    a, b = comps(pipeline, rgb), comps(pipeline, flat)
    assert b["contrast"].value < 0.6 * a["contrast"].value
    assert b["dynamic_range"].value < a["dynamic_range"].value - 0.8


def test_side_lighting_lowers_illumination_uniformity(pipeline: Pipeline) -> None:
    for rel in FRONTAL[:3]:
        rgb = rgb_of(rel)
        a = comps(pipeline, rgb)
        lit = rgb.astype(np.float64)
        lit[:, : rgb.shape[1] // 2] *= 0.45  # LFW faces are centred: the image-left half of the face in shadow
        b = comps(pipeline, lit.astype(np.uint8))
        assert b["illumination_uniformity"].value < a["illumination_uniformity"].value - 0.2, rel


def test_padding_shrinks_face_size_and_a_tight_crop_shrinks_margins(pipeline: Pipeline) -> None:
    rgb = rgb_of(FRONTAL[0])
    h, w = rgb.shape[:2]
    a = comps(pipeline, rgb)
    padded = cv2.copyMakeBorder(rgb, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    b = comps(pipeline, padded)
    assert abs(b["face_size"].value / a["face_size"].value - 0.5) < 0.05
    assert b["margins"].value > a["margins"].value
    assert a["margins"].value > 1.0  # a deep-funnelled LFW photo has room on every side
    p = pipeline.prepare(("x", DecodedImage(rgb, "x")), Options(select="center"))
    x1, y1, x2, y2 = p.detections[0].bbox.astype(int)
    tight = np.ascontiguousarray(rgb[max(y1 - 5, 0):y2 + 5, max(x1 - 5, 0):x2 + 5])
    c = comps(pipeline, tight)
    assert c["margins"].value < 1.0 and c["margins"].score < 50


# -- plumbing ---------------------------------------------------------------------------------------------------

def test_assess_with_components_on_the_group_photo(pipeline: Pipeline) -> None:
    res = pipeline.assess(SAMPLES / "t1.jpg", Options(components=True))
    assert len(res.faces) == 6
    for face in res.faces:
        assert face.components is not None and list(face.components) == list(COMPONENT_NAMES)
        assert face.quality is not None
        for c in face.components.values():
            assert math.isfinite(c.value) and (c.score is None or 0 <= c.score <= 100)
    out = res.to_dict()["faces"][0]["components"]
    assert set(out["yaw"]) == {"value", "unit", "score"} and out["yaw"]["unit"] == "deg"
    assert out["face_size"]["score"] is None
    plain = pipeline.assess(SAMPLES / "t1.jpg")
    assert all(f.components is None for f in plain.faces) and "components" not in plain.to_dict()["faces"][0]


def test_components_of_an_aligned_input(pipeline: Pipeline) -> None:
    res = pipeline.assess(SAMPLES / "Tom_Hanks_54745.png", Options(aligned=True, components=True))
    (face,) = res.faces
    assert face.components is not None
    assert abs(face.components["inter_eye_distance"].value - 35.2) < 0.1  # the template's, at 112 px
    assert face.components["margins"].value < 1.0  # an aligned crop is no portrait


def crfiqa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crfiqa.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_cli_score_components_json_csv_and_annotate(tmp_path: Path) -> None:
    src = [str(SAMPLES / "t1.jpg"), str(IMAGES / FRONTAL[0])]
    r = crfiqa("score", *src, "--components", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]["faces"]) == 6
    assert all(list(f["components"]) == list(COMPONENT_NAMES) for x in rows for f in x["faces"])
    out = tmp_path / "s.csv"
    r = crfiqa("score", *src, "--components", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(out.open()))
    assert all(name in table[0] for name in COMPONENT_NAMES) and len(table) >= 7
    assert float(table[0]["inter_eye_distance"]) == pytest.approx(rows[0]["faces"][0]["components"][
        "inter_eye_distance"]["value"], abs=1e-3)
    ann = tmp_path / "ann"
    r = crfiqa("score", *src, "--annotate", str(ann), "--quiet")
    assert r.returncode == 0, r.stderr
    assert not any("components" in f for line in r.stdout.splitlines() for f in json.loads(line)["faces"])
    written = sorted(p.relative_to(ann).as_posix() for p in ann.rglob("*") if p.is_file())
    assert len(written) == 2, written
    for name, original in zip(written, sorted(src, key=lambda s: Path(s).name)):
        drawn = cv2.imread(str(ann / name))
        orig = cv2.imread(original)
        assert drawn is not None and orig is not None and drawn.shape == orig.shape, name
        changed = np.any(np.abs(drawn.astype(int) - orig.astype(int)) > 60, axis=2).mean()
        assert 0.001 < changed < 0.5, (name, changed)  # boxes and text drawn, the photo still there

"""Best-shot selection on real LFW photos: bursts of one clean photo and five degraded copies, two people
mixed, the same frames as an MP4 video, and the CLI as users run it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crfiqa.service.bestshot import best_shots, expand
from crfiqa.service.imaging import read_image
from crfiqa.service.pipeline import Pipeline
from tests.helpers import LFW, SHARED_MODELS

#: Two people whose clean photos the default model scores well above all five degraded copies (measured:
#: raw margins >= 0.04 over the best copy).
PEOPLE = ["Albert_Costa/Albert_Costa_0006.jpg", "Terrence_Trammell/Terrence_Trammell_0001.jpg"]
ENV = {**os.environ, "CRFIQA_MODELS_DIR": str(SHARED_MODELS), "CRFIQA_PROVIDERS": "CPUExecutionProvider"}


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def burst(rgb: np.ndarray, same_size: bool = False) -> dict[str, np.ndarray]:
    """The clean photo and five degraded copies (blur, downscale, darken, JPEG, blur + JPEG); with
    ``same_size`` the downscaled copy is scaled back up (video frames share one size)."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 5, h // 5), interpolation=cv2.INTER_AREA)
    if same_size:
        small = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return {"clean": rgb, "blur": cv2.GaussianBlur(rgb, (0, 0), 3.5), "down": small,
            "dark": (255.0 * (rgb / 255.0) ** 3.5).astype(np.uint8), "jpeg": jpeg(rgb, 6),
            "blurjpeg": jpeg(cv2.GaussianBlur(rgb, (0, 0), 1.5), 15)}


def write_burst(folder: Path, person: str, same_size: bool = False) -> dict[str, Path]:
    """The burst of one LFW person as PNG files (lossless: each copy keeps exactly its degradation)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, img in burst(read_image(LFW / "images" / person).rgb, same_size).items():
        path = folder / f"{Path(person).stem}_{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out[name] = path
    return out


def test_one_burst_returns_the_clean_photo(pipeline: Pipeline, tmp_path: Path) -> None:
    files = write_burst(tmp_path, PEOPLE[0])
    identities, errors = best_shots(pipeline, [tmp_path])
    assert not errors
    assert len(identities) == 1 and len(identities[0].shots) == 6
    line = identities[0].to_dict(0)
    assert line["best"]["path"] == str(files["clean"])
    assert line["runner_up"]["path"] != str(files["clean"])
    assert line["best"]["quality"]["raw"] > line["runner_up"]["quality"]["raw"]
    assert set(line["best"]["components"]) >= {"yaw", "sharpness", "inter_eye_distance"}
    assert "frame" not in line["best"]


def test_two_mixed_bursts_give_two_identities_with_their_clean_photos(pipeline: Pipeline, tmp_path: Path) -> None:
    a = write_burst(tmp_path / "mixed", PEOPLE[0])
    b = write_burst(tmp_path / "mixed", PEOPLE[1])
    extra = write_burst(tmp_path / "more", PEOPLE[1])  # a second copy of B's burst: B has more shots
    identities, errors = best_shots(pipeline, [tmp_path / "mixed", extra["clean"], extra["blur"]])
    assert not errors
    lines = [ident.to_dict(k) for k, ident in enumerate(identities)]
    assert [x["count"] for x in lines] == [8, 6]  # ordered by count
    assert lines[0]["best"]["path"] in (str(b["clean"]), str(extra["clean"]))
    assert lines[1]["best"]["path"] == str(a["clean"])
    members = {s.path for s in identities[1].shots}
    assert members == {str(p) for p in a.values()}  # nobody of B joined A


def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> None:
    """An MP4 (mp4v) written by OpenCV."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def video_frames() -> tuple[list[np.ndarray], dict[str, int]]:
    """Both people's same-size bursts interleaved; returns the frames and each clean frame's index."""
    a = burst(read_image(LFW / "images" / PEOPLE[0]).rgb, same_size=True)
    b = burst(read_image(LFW / "images" / PEOPLE[1]).rgb, same_size=True)
    order = [("a", "blur"), ("b", "dark"), ("a", "down"), ("b", "clean"), ("a", "jpeg"), ("b", "blur"),
             ("a", "clean"), ("b", "jpeg"), ("a", "dark"), ("b", "down"), ("a", "blurjpeg"), ("b", "blurjpeg")]
    frames = [(a if who == "a" else b)[name] for who, name in order]
    return frames, {"a": order.index(("a", "clean")), "b": order.index(("b", "clean"))}


def test_an_mp4_of_the_bursts_gives_the_same_answer(pipeline: Pipeline, tmp_path: Path) -> None:
    frames, clean = video_frames()
    video = tmp_path / "bursts.mp4"
    write_video(video, frames)
    assert sum(1 for _ in expand([video])) == len(frames)
    identities, errors = best_shots(pipeline, [video])
    assert not errors
    lines = [ident.to_dict(k) for k, ident in enumerate(identities)]
    assert [x["count"] for x in lines] == [6, 6]
    assert {x["best"]["frame"] for x in lines} == {clean["a"], clean["b"]}
    assert all(x["best"]["path"] == str(video) for x in lines)
    every = list(expand([video], every=3))
    assert [frame for _, frame, _ in every] == [0, 3, 6, 9]


def test_a_video_whose_name_is_not_utf8_is_read(tmp_path: Path) -> None:
    """OpenCV's VideoCapture crashed the process (SIGSEGV) on such a name: the frames come, named after it."""
    import os

    frames, _ = video_frames()
    write_video(tmp_path / "v.mp4", frames)
    named = tmp_path / os.fsdecode(b"s\xe9quence.mp4")
    (tmp_path / "v.mp4").rename(named)
    got = list(expand([named], every=2))
    assert [frame for _, frame, _ in got] == list(range(0, len(frames), 2))
    assert all(path == str(named) and not isinstance(src, Exception) for path, _, src in got)


def test_cli_best_on_files_and_video_with_a_bad_input(tmp_path: Path) -> None:
    a = write_burst(tmp_path / "a", PEOPLE[0])
    frames, clean = video_frames()
    write_video(tmp_path / "v.mp4", frames)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    # The folder, one of its files again and the video twice: every file counts once.
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "best", str(tmp_path / "a"), str(tmp_path / "v.mp4"),
                        str(a["clean"]), str(tmp_path / "broken.jpg"), str(tmp_path / "." / "v.mp4"),
                        "--every", "1", "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["identity"] for x in lines] == [0, 1]
    assert [x["count"] for x in lines] == [12, 6]  # A: six files + six frames; B: six frames
    assert lines[0]["best"]["path"] in (str(a["clean"]), str(tmp_path / "v.mp4"))
    assert lines[1]["best"] == {**lines[1]["best"], "path": str(tmp_path / "v.mp4"), "frame": clean["b"]}
    errors = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    assert [e["path"] for e in errors] == [str(tmp_path / "broken.jpg")] and errors[0]["status"] == "error"


def test_bad_every_is_a_typed_error(pipeline: Pipeline) -> None:
    from crfiqa.service.errors import CrfiqaError

    with pytest.raises(CrfiqaError) as info:
        best_shots(pipeline, [LFW / "images" / PEOPLE[0]], every=0)
    assert info.value.code == "bad_argument"


def test_api_best_and_quality_components(tmp_path: Path) -> None:
    """A real ``crfiqa serve`` process: ``POST /v1/best`` with two mixed bursts in one multipart request, and
    ``components=true`` on ``POST /v1/quality``."""
    import httpx

    from crfiqa.service.components import COMPONENT_NAMES
    from tests.server import Server

    a = write_burst(tmp_path, PEOPLE[0])
    b = write_burst(tmp_path, PEOPLE[1])
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in [*a.values(), *b.values()]]
    files.append(("images", ("broken.jpg", b"\xff\xd8\xff not a jpeg", "image/jpeg")))
    srv = Server(env={"CRFIQA_WARMUP_ROUNDS": "1"}, log=tmp_path / "server.log")
    try:
        srv.wait_ready(300)
        r = httpx.post(srv.url + "/v1/best", files=files, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["embedder"] == {"name": "w600k_mbf", "threshold": 0.30}
        ids = body["identities"]
        assert [x["count"] for x in ids] == [6, 6]
        assert {x["best"]["id"] for x in ids} == {a["clean"].name, b["clean"].name}
        assert all(x["runner_up"]["id"] != x["best"]["id"] for x in ids)
        assert list(ids[0]["best"]["components"]) == list(COMPONENT_NAMES)
        assert [e["id"] for e in body["errors"]] == ["broken.jpg"] and body["errors"][0]["status"] == "error"
        for shot in [x[role] for x in ids for role in ("best", "runner_up")]:
            assert files[shot["image"]][1][0] == shot["id"]  # the position names the same file
        # Browsers name every file "blob": the position still tells the two people's best shots apart.
        blobs = [("images", ("blob", data, mime)) for _, (_, data, mime) in files[:-1]]
        r = httpx.post(srv.url + "/v1/best", files=blobs, timeout=300)
        assert r.status_code == 200, r.text
        best = {x["best"]["image"] for x in r.json()["identities"]}
        names = {files[i][1][0] for i in best}
        assert names == {a["clean"].name, b["clean"].name}

        one = [("images", (a["clean"].name, a["clean"].read_bytes(), "image/png"))]
        r = httpx.post(srv.url + "/v1/quality", files=one, params={"components": "true"}, timeout=120)
        assert r.status_code == 200, r.text
        face = r.json()["results"][0]["faces"][0]
        assert list(face["components"]) == list(COMPONENT_NAMES)
        assert set(face["components"]["yaw"]) == {"value", "unit", "score"}
        r = httpx.post(srv.url + "/v1/quality", files=one, timeout=120)
        assert "components" not in r.json()["results"][0]["faces"][0]
        spec = httpx.get(srv.url + "/openapi.json", timeout=30).json()
        assert "/v1/best" in spec["paths"]
    finally:
        srv.stop()


def test_api_best_without_its_recognition_model_is_a_typed_503(tmp_path: Path) -> None:
    """A deployment whose models lack w600k_mbf still serves /v1/quality; /v1/best says why it cannot, at once."""
    import httpx

    from tests.helpers import SAMPLES, SHARED_MODELS
    from tests.server import Server

    (tmp_path / "models" / "det").mkdir(parents=True)
    (tmp_path / "models" / "det" / "scrfd_500m.onnx").symlink_to(SHARED_MODELS / "det" / "scrfd_500m.onnx")
    face = (SAMPLES / "Tom_Hanks_54745.png").read_bytes()
    srv = Server(env={"CRFIQA_WARMUP_ROUNDS": "1", "CRFIQA_MODELS_DIR": str(tmp_path / "models")},
                 log=tmp_path / "server.log")
    try:
        srv.wait_ready(300)
        files = [("images", ("face.png", face, "image/png"))]
        r = httpx.post(srv.url + "/v1/best", files=files, timeout=60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["code"] == "model_unavailable" and "w600k_mbf" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/quality", files=files, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "ok"
    finally:
        srv.stop()


def test_quality_embedder_shares_w600k_mbf_threshold_because_it_is_its_embedding() -> None:
    """crfiqa_mbf v2's ``embedding`` output is w600k_mbf's (frozen backbone), so ``--embedder quality`` must use
    w600k_mbf's measured threshold; a model whose embedding drifted would need its own measurement."""
    from crfiqa.service.bestshot import DEFAULT_THRESHOLDS, create_embedder
    from crfiqa.service.pipeline import PipelineSettings

    pipe = Pipeline(PipelineSettings(models_dir=SHARED_MODELS, providers=("CPUExecutionProvider",)))
    crops = np.concatenate([prepared.crops for _, prepared in pipe.run([LFW / "images" / p for p in PEOPLE], score=False)])
    assert len(crops) >= len(PEOPLE)
    (quality, qname), (w600k, wname) = create_embedder(pipe, "quality"), create_embedder(pipe, "w600k_mbf")
    assert np.abs(quality.embed(crops) - w600k.embed(crops)).max() < 1e-4
    assert DEFAULT_THRESHOLDS[qname] == DEFAULT_THRESHOLDS[wname]

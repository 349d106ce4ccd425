"""Training: data readers, losses, the loop (single process, torchrun DDP, resume), export and import."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from crfiqa.service.facemodel import QualityModel
from crfiqa.service.imaging import decode_image
from crfiqa.service.preprocess import to_blob
from crfiqa.service.registry import resolve
from crfiqa.training.backbones import create_backbone, list_backbones
from crfiqa.training.config import CONFIG_DIR, load_config
from crfiqa.training.convert_official import load_official
from crfiqa.training.data import open_dataset
from crfiqa.training.data.folder import folder_samples
from crfiqa.training.data.recordio import RecordIO, write_rec
from crfiqa.training.export import check_parity, export_onnx, fit_calibration
from crfiqa.training.losses import ArcFaceHead, CRFIQALoss, certainty_target
from crfiqa.training.train import load_checkpoint
from crfiqa.training.train import main as train_main
from tests.helpers import SHARED, SHARED_MODELS

FIXTURES = SHARED / "data" / "fixtures"
REC = FIXTURES / "train.rec"
MBF = SHARED_MODELS / "fr" / "insightface_w600k_mbf.onnx"


# ---------------------------------------------------------------- data

def test_recordio_reads_fixture_exactly() -> None:
    expected = json.loads((FIXTURES / "train_expected.json").read_text())
    rec = RecordIO(REC)
    assert rec.image_keys() == [e["index"] for e in expected["images"]]
    assert list(rec.read(0).label) == expected["header_label"]
    for e in expected["images"]:
        r = rec.read(e["index"])
        assert (r.class_id, r.flag, len(r.image)) == (e["label"], e["flag"], e["jpeg_bytes"])
        assert hashlib.sha256(r.image).hexdigest() == e["jpeg_sha256"]
    for key, (start, end) in zip(range(33, 41), expected["identity_ranges"]):
        assert list(rec.read(key).label) == [start, end]


def test_recordio_writer_round_trip(tmp_path: Path) -> None:
    src = RecordIO(REC)
    items = [(src.read(k).class_id, src.read(k).image) for k in src.image_keys()]
    write_rec(tmp_path / "train.rec", items)
    back = RecordIO(tmp_path / "train.rec")
    assert [(back.read(k).class_id, back.read(k).image) for k in back.image_keys()] == sorted(items, key=lambda x: x[0])


def test_dataset_uses_the_service_preprocessing() -> None:
    ds = open_dataset(REC, augment=[])
    assert len(ds) == 32 and ds.num_classes == 8
    x, y = ds[5]
    crop = decode_image(RecordIO(REC).read(ds.samples[5][0][1]).image).rgb
    assert torch.equal(x, torch.from_numpy(to_blob(crop)[0])) and y == 1
    assert x.shape == (3, 112, 112) and x.min() >= -1.0 and x.max() <= 1.0


def test_flip_augmentation_is_seeded_per_epoch() -> None:
    ds = open_dataset(REC, augment=None, seed=3)
    a = [ds[i][0] for i in range(8)]
    assert all(torch.equal(u, v) for u, v in zip(a, [ds[i][0] for i in range(8)]))
    flipped = [torch.equal(t, torch.from_numpy(to_blob(ds.load(i))[0]).flip(-1)) for i, t in enumerate(a)]
    assert any(flipped) and not all(flipped)


def test_folder_dataset_and_identity_cap(tmp_path: Path) -> None:
    for ident in ["Bob", "Alice"]:
        (tmp_path / ident).mkdir()
        for i in range(3):
            shutil.copy(SHARED / "data" / "samples" / "Tom_Hanks_54745.png", tmp_path / ident / f"{i}.png")
    samples = folder_samples(tmp_path)
    assert [(p.parent.name, y) for p, y in samples] == [("Alice", 0)] * 3 + [("Bob", 1)] * 3
    ds = open_dataset(tmp_path, max_per_identity=2)
    assert len(ds) == 4 and ds[0][0].shape == (3, 112, 112)


@pytest.mark.slow
def test_prepare_aligns_identity_folders(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for ident in sorted((SHARED / "data" / "train").iterdir())[:2]:
        if ident.is_dir():
            (src / ident.name).mkdir(parents=True)
            for img in sorted(ident.glob("*.jpg"))[:3]:
                shutil.copy(img, src / ident.name)
    (src / ident.name / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "aligned"
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "prepare", str(src), "--out", str(out),
                        "--models-dir", str(SHARED_MODELS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["images"] == 7 and summary["aligned"] == 6 and summary["skipped"] == 1
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 6 and decode_image(pngs[0].read_bytes()).rgb.shape == (112, 112, 3)
    # A crop that cannot be written (a file stands where the first identity's folder goes) skips that image;
    # the other identity is still prepared.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    first = sorted(p.name for p in src.iterdir())[0]
    (blocked / first).write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "prepare", str(src), "--out", str(blocked),
                        "--models-dir", str(SHARED_MODELS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["aligned"] == 3 and summary["skipped"] == 4 and "write_error" in (blocked / "skipped.txt").read_text()


@pytest.mark.slow
def test_prepare_mirrors_relative_paths(tmp_path: Path) -> None:
    # Same-stem inputs (a/img.jpg, b/img.jpg, img.jpg, img.png) used to overwrite one another's output.
    face = sorted((SHARED / "data" / "train").iterdir())[0]
    jpg = sorted(face.glob("*.jpg"))[0]
    ident = tmp_path / "raw" / "Someone"
    for rel in ["a/img.jpg", "b/img.jpg", "img.jpg"]:
        (ident / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(jpg, ident / rel)
    import cv2

    from crfiqa.service.imaging import read_image

    cv2.imwrite(str(ident / "img.png"), cv2.cvtColor(read_image(jpg).rgb[:, ::-1], cv2.COLOR_RGB2BGR))
    out = tmp_path / "aligned"
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "prepare", str(tmp_path / "raw"), "--out", str(out),
                        "--models-dir", str(SHARED_MODELS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    written = sorted(p.relative_to(out / "Someone").as_posix() for p in (out / "Someone").rglob("*.png"))
    assert written == ["a/img.png", "b/img.png", "img.jpg.png", "img.png.png"]
    flipped = read_image(out / "Someone" / "img.png.png").rgb
    assert not np.array_equal(flipped, read_image(out / "Someone" / "img.jpg.png").rgb)  # not overwritten


# ---------------------------------------------------------------- model and losses

@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_backbones_forward_and_backward(name: str) -> None:
    model = create_backbone(name)
    out = model(torch.randn(2, 3, 112, 112))
    assert out.embedding.shape == (2, 512) and out.quality.shape == (2, 1) and torch.isfinite(out.embedding).all()
    (out.embedding.sum() + out.quality.sum()).backward()
    assert model.qs.weight.grad is not None


def test_iresnet_parameter_names_match_published_layout() -> None:
    names = set(create_backbone("iresnet50").state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
                "layer1.0.bn2.weight", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer3.13.conv2.weight",
                "bn2.weight", "fc.weight", "features.weight", "qs.weight", "qs.bias"]:
        assert key in names, key
    assert "layer3.14.conv1.weight" not in names and "layer4.2.bn1.weight" in names
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"} <= set(list_backbones())


def test_unknown_backbone_lists_names() -> None:
    with pytest.raises(ValueError, match="iresnet50"):
        create_backbone("resnet9000")


def test_onnx_import_matches_onnx_runtime_on_real_faces(pipeline) -> None:
    model = create_backbone(f"onnx:{MBF}").eval()
    crops = np.concatenate([p.crops for _, p in pipeline.run([SHARED / "data" / "samples" / "t1.jpg"], score=False)])
    x = to_blob(crops)
    ref = ort.InferenceSession(str(MBF), providers=["CPUExecutionProvider"]).run(None, {"input.1": x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).embedding.numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_arcface_logits_and_cr_targets_by_hand() -> None:
    head = ArcFaceHead(2, 3, s=10.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    emb = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    logits, cos = head(emb, torch.tensor([0]))
    assert torch.allclose(cos, torch.tensor([[0.6, 0.8, -0.6]]))
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(math.acos(0.6) + 0.5), abs=1e-5)
    assert torch.allclose(logits[0, 1:], torch.tensor([8.0, -6.0]))
    cr, ccs, nnccs = certainty_target(cos, torch.tensor([0]), "paper")
    assert (ccs.item(), nnccs.item()) == pytest.approx((0.6, 0.8))
    assert cr.item() == pytest.approx(0.6 / (0.8 + 1 + 1e-9))
    assert certainty_target(cos, torch.tensor([0]), "ccs")[0].item() == pytest.approx(0.6)
    assert certainty_target(cos, torch.tensor([0]), "official")[0].item() == pytest.approx(0.6 / 0.8)


def test_official_target_explodes_when_negatives_are_not_positive() -> None:
    cos = torch.tensor([[0.7, -0.2, -0.5]])
    official = certainty_target(cos, torch.tensor([0]), "official")[0].item()
    paper = certainty_target(cos, torch.tensor([0]), "paper")[0].item()
    assert abs(official) > 1e10 and paper == pytest.approx(0.7 / 0.8)


def test_loss_reports_named_parts() -> None:
    head = ArcFaceHead(8, 4)
    loss = CRFIQALoss(head, "paper", quality_weight=10.0, beta=0.5)
    out = loss(torch.randn(6, 8), torch.zeros(6, 1), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert out.total.item() == pytest.approx(out.ce_loss.item() + out.quality_loss.item())
    assert set(out.report) == {"ccs", "nnccs", "cr", "qs"}


def test_loss_runs_in_float32_inside_a_bf16_autocast_region() -> None:
    """The training loop's bf16 autocast (CUDA there, CPU here: the same rules for F.linear) must not reach
    the ArcFace cosines or the CR targets: the loss of bf16 activations equals the float32 loss of the same
    values (the bf16 cosines it computed before moved the CE loss by ~0.1)."""
    torch.manual_seed(0)
    head = ArcFaceHead(64, 50)
    loss = CRFIQALoss(head, "paper")
    emb = torch.randn(32, 64).bfloat16()
    quality = torch.rand(32, 1).bfloat16()
    labels = torch.randint(0, 50, (32,))
    reference = loss(emb.float(), quality.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(emb, quality, labels)
    assert mixed.total.dtype == torch.float32
    assert mixed.ce_loss.item() == pytest.approx(reference.ce_loss.item(), abs=1e-5)
    assert mixed.report["cr"] == pytest.approx(reference.report["cr"], abs=1e-6)


# ---------------------------------------------------------------- the loop

def _config(tmp_path: Path, **kw) -> Path:
    values = {"data": str(REC), "backbone": "mobilefacenet", "batch_size": 8, "lr": 0.05, "workers": 0,
              "checkpoint_every": 1000, "log_every": 10, "milestones": [1000], **kw}
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def _losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in csv.DictReader((run / "log.csv").open())}


@pytest.mark.slow
def test_loss_decreases(tmp_path: Path) -> None:
    out = train_main(["--config", str(_config(tmp_path)), "--max-steps", "40", "--out", str(tmp_path / "run")])
    rows = {int(r["step"]): r for r in csv.DictReader((tmp_path / "run" / "log.csv").open())}
    mean = lambda key, steps: np.mean([float(rows[s][key]) for s in steps])  # noqa: E731
    assert mean("ce_loss", range(31, 41)) < 0.5 * mean("ce_loss", range(1, 6))
    assert mean("loss", range(31, 41)) < mean("loss", range(1, 6))
    assert out["step"] == 40 and (tmp_path / "run" / "latest.pt").is_file()
    # A fresh run into the same folder would mix its checkpoints with these: refused, with what to do.
    with pytest.raises(ValueError, match="--resume"):
        train_main(["--config", str(_config(tmp_path)), "--max-steps", "2", "--out", str(tmp_path / "run")])


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = _config(tmp_path, checkpoint_every=3, backbone="iresnet18", batch_size=4)  # dropout: RNG state matters
    train_main(["--config", str(cfg), "--max-steps", "6", "--out", str(tmp_path / "a")])
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copy(tmp_path / "a" / "checkpoint_000003.pt", resumed / "start.pt")
    train_main(["--config", str(cfg), "--max-steps", "6", "--out", str(resumed), "--resume", str(resumed / "start.pt")])
    a, b = _losses(tmp_path / "a"), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == pytest.approx([a[s] for s in (4, 5, 6)], rel=1e-5)
    ckpt = load_checkpoint(tmp_path / "a")
    assert ckpt["step"] == 6 and set(ckpt) >= {"backbone", "head", "optimizer", "config", "scheduler"}
    # Continuing under other training settings is refused before any work, naming what changed.
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.05 there, 0\.01 here\)"):
        train_main(["--config", str(cfg), "--max-steps", "9", "--lr", "0.01", "--out", str(resumed),
                    "--resume", str(resumed / "start.pt")])


@pytest.mark.slow
def test_gradient_clipping_leaves_the_arcface_centres_alone(tmp_path: Path) -> None:
    runs = {}
    for clip in (0.0, 1e-6):
        out = tmp_path / f"clip{clip}"
        train_main(["--config", str(_config(tmp_path, grad_clip=clip)), "--max-steps", "1", "--out", str(out)])
        runs[clip] = load_checkpoint(out)
    free, clipped = runs[0.0], runs[1e-6]
    # The same first step for the centres (arcface_torch clips backbone.parameters() only) ...
    assert torch.equal(free["head"]["weight"], clipped["head"]["weight"])
    # ... while the network's step is clipped.
    moved = [k for k, v in free["backbone"].items() if v.is_floating_point() and not torch.equal(v, clipped["backbone"][k])]
    assert moved


def _digests(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"rank (\d) weights_sha256 ([0-9a-f]{64})", stdout))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["simultaneous", "on_top"])
def test_torchrun_gloo_ranks_stay_identical(tmp_path: Path, mode: str) -> None:
    # on_top: only qs trains, outside the backbone's DDP wrapper; before the fix its gradients were never
    # all-reduced and the two ranks ended with different qs weights.
    cfg = _config(tmp_path, batch_size=4, mode=mode, lr=0.5)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "crfiqa.training.train", "--config", str(cfg), "--max-steps", "4",
                        "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    digests = _digests(r.stdout)
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert len(_losses(tmp_path / "ddp")) == 4  # only rank 0 writes
    if mode == "on_top":  # the run's initial weights (seed 0): the backbone stayed, qs moved
        torch.manual_seed(0)
        start = create_backbone("mobilefacenet").state_dict()
        trained = load_checkpoint(tmp_path / "ddp")["backbone"]
        assert all(torch.equal(trained[k], v) for k, v in start.items() if not k.startswith("qs.")
                   and "running" not in k and "num_batches" not in k)
        assert not torch.equal(trained["qs.weight"], start["qs.weight"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_c10d_rendezvous_on_loopback(tmp_path: Path) -> None:
    # Two torchrun agents (one per "node", one process each) meet through the c10d rendezvous: the
    # multi-node path is run, not only claimed.
    cfg = _config(tmp_path, batch_size=4)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "crfiqa-test",
                               "-m", "crfiqa.training.train", "--config", str(cfg), "--max-steps", "3",
                               "--out", str(tmp_path / f"node{k}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    digests = {**_digests(outs[0][0]), **_digests(outs[1][0])}
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    written = [k for k in range(2) if (tmp_path / f"node{k}" / "log.csv").exists()]
    assert len(written) == 1 and len(_losses(tmp_path / f"node{written[0]}")) == 3  # global rank 0 only


def test_init_backbone_shape_check(tmp_path: Path) -> None:
    from crfiqa.training.train import load_init_backbone

    state = create_backbone("iresnet18").state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="wrong shape"):
        load_init_backbone(create_backbone("iresnet18"), str(tmp_path / "bad.pth"))


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("backbone: iresnet50\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(tmp_path / "c.yaml")
    cfg = load_config("casia_r50")
    assert (cfg.milestones, cfg.max_steps, cfg.lr, cfg.quality_weight) == ([20000, 28000], 32000, 0.1, 10.0)
    assert load_config("ms1mv2_r100").milestones == [100000, 160000]


def test_every_shipped_config_loads_and_the_full_finetune_differs_only_in_freezing() -> None:
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path.stem)  # unknown keys or a missing base fail here
    half, full = load_config("crfiqa_mbf_v2_finetune").to_dict(), load_config("crfiqa_mbf_v2_full_finetune").to_dict()
    assert {k for k in half if half[k] != full[k]} == {"freeze_fraction", "out"}
    assert (half["freeze_fraction"], full["freeze_fraction"]) == (0.5, 0.0)


# ---------------------------------------------------------------- export and import

def test_export_parity_and_service_contract(tmp_path: Path, pipeline) -> None:
    model = create_backbone("mobilefacenet").eval()
    path = export_onnx(model, tmp_path / "q.onnx")
    crops = np.concatenate([p.crops for _, p in pipeline.run([SHARED / "data" / "samples" / "t1.jpg"], score=False)])
    assert check_parity(model, path, crops) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert {o.name for o in session.get_outputs()} == {"embedding", "quality"}
    cal = fit_calibration(np.arange(101.0))
    assert cal.centre == pytest.approx(50.0) and cal.scale == pytest.approx(80 / (2 * math.log(4)))
    p, entry = resolve(str(path), "quality")
    qm = QualityModel(p, entry, ("CPUExecutionProvider",))
    with torch.no_grad():
        ref = model(torch.from_numpy(to_blob(crops))).quality.numpy()[:, 0]
    assert np.abs(qm.predict(crops) - ref).max() <= 1e-4


@pytest.mark.slow
def test_convert_official_synthetic_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = create_backbone("iresnet50").state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "32572backbone.pth")
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "convert-official",
                        str(tmp_path / "32572backbone.pth"), "--arch", "iresnet50", "--out", str(tmp_path / "s.onnx")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["parity"] <= 1e-4 and (tmp_path / "s.toml").is_file()


def test_convert_official_wrong_checkpoint_lists_keys(tmp_path: Path) -> None:
    state = create_backbone("iresnet50").state_dict()
    del state["qs.weight"]
    state["head.kernel"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        load_official(tmp_path / "bad.pth", "iresnet50")
    assert "qs.weight" in str(e.value) and "head.kernel" in str(e.value)
    with pytest.raises(ValueError, match="iresnet50"):
        load_official(tmp_path / "bad.pth", "iresnet18")


# ---------------------------------------------------------------- v2: norm-aware head, LOO centres

def test_norm_aware_head_sees_the_norm_and_ridge_init_fits_by_hand() -> None:
    from crfiqa.training.heads import NormAwareHead, build_quality_head, ridge_init

    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(200, 8))
    norms = torch.rand(200, 1) * 20 + 5
    emb = direction * norms
    target = 0.3 * norms[:, 0].log() - 0.2  # a quality that depends on the norm only
    linear, head = build_quality_head("linear", 8), build_quality_head("norm", 8)
    assert isinstance(head, NormAwareHead)
    rmse_norm, rmse_linear = ridge_init(head, emb, target, alpha=1e-6), ridge_init(linear, emb, target, alpha=1e-6)
    assert rmse_norm < 1e-4 < 0.01 < rmse_linear  # Linear(e) cannot express log|e|; the norm head can
    assert torch.allclose(head(emb)[:, 0], target, atol=1e-3)
    feats = NormAwareHead.features(emb)
    assert torch.allclose(feats[:, :8].norm(dim=1), torch.ones(200)) and torch.allclose(feats[:, 8], norms[:, 0].log())
    with pytest.raises(ValueError, match="quality_head"):
        build_quality_head("mlp", 8)


def test_weighted_ridge_fit_equals_the_fit_on_duplicated_rows() -> None:
    from crfiqa.training.heads import ridge_fit

    torch.manual_seed(1)
    x, y = torch.randn(40, 5), torch.randn(40)
    counts = torch.randint(1, 4, (40,))
    weighted, duplicated, plain = (torch.nn.Linear(5, 1) for _ in range(3))
    rmse_w = ridge_fit(weighted, x, y, alpha=3.0, weights=counts.float())
    rmse_d = ridge_fit(duplicated, x.repeat_interleave(counts, 0), y.repeat_interleave(counts), alpha=3.0)
    ridge_fit(plain, x, y, alpha=3.0)
    assert torch.allclose(weighted.weight, duplicated.weight, atol=1e-6)
    assert torch.allclose(weighted.bias, duplicated.bias, atol=1e-6) and abs(rmse_w - rmse_d) < 1e-9
    assert not torch.allclose(weighted.weight, plain.weight, atol=1e-3)  # the weights do change the fit


def test_leave_one_out_centres_by_hand() -> None:
    from crfiqa.training.losses import LeaveOneOutCentres

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loo = LeaveOneOutCentres(bank, labels, 2)
    e = torch.tensor([[1.0, 0.0]])
    cos = loo.cosines(e, torch.tensor([0]), torch.tensor([0]))
    # own class without sample 0 = sample 1 = (0, 1): cos 0; class 1 centre = normalise((1,1)/sqrt2 + (-1,0))
    c1 = torch.nn.functional.normalize(torch.tensor([1 / 2**0.5 - 1, 1 / 2**0.5]), dim=0)
    assert cos[0, 0].item() == pytest.approx(0.0, abs=1e-6) and cos[0, 1].item() == pytest.approx(c1[0].item(), abs=1e-6)
    # A 2-image class: the target of each image is its similarity to the *other* image, not to itself.
    target = certainty_target(cos, torch.tensor([0]), "paper")[0]
    assert target.item() == pytest.approx(0.0 / (c1[0].item() + 1 + 1e-9), abs=1e-6)
    again = LeaveOneOutCentres.from_state_dict(loo.state_dict())
    assert torch.allclose(again.cosines(e, torch.tensor([0]), torch.tensor([0])), cos, atol=1e-7)
    # A class with no sample is never the nearest other class (its centre, 0, gave cosine 0 > every negative
    # cosine); a class with one sample has no centre without it: refused, not a CR of 0.
    gapped = LeaveOneOutCentres(bank, torch.tensor([0, 0, 2, 2]), 3)
    far = torch.tensor([[-1.0, -1.0]])
    nn_cos = certainty_target(gapped.cosines(far, torch.tensor([0]), torch.tensor([0])), torch.tensor([0]), "paper")[2]
    c2 = torch.nn.functional.normalize(torch.tensor([1 / 2**0.5 - 1, 1 / 2**0.5]), dim=0)
    assert nn_cos.item() == pytest.approx(float((torch.nn.functional.normalize(far, dim=1)[0] * c2).sum()), abs=1e-6)
    with pytest.raises(ValueError, match="one sample"):
        LeaveOneOutCentres(bank, torch.tensor([0, 0, 0, 1]), 2)


@pytest.mark.slow
def test_v2_recipe_runs_and_resumes(tmp_path: Path) -> None:
    cfg = _config(tmp_path, data=str(REC), backbone="mobilefacenet", quality_head="norm", qs_init="ridge",
                  cr_centres="loo", head_init="class_means", checkpoint_every=2, keep_checkpoints=1,
                  quality_lr_mult=0.05)
    train_main(["--config", str(cfg), "--max-steps", "2", "--out", str(tmp_path / "run")])
    run = tmp_path / "run"
    assert (run / "loo_centres.pt").is_file() and (run / "clean_embeddings.pt").is_file()
    train_main(["--config", str(cfg), "--max-steps", "4", "--out", str(run), "--resume", str(run)])
    assert sorted(_losses(run)) == [1, 2, 3, 4] and [p.name for p in run.glob("checkpoint_*.pt")] == ["checkpoint_000004.pt"]
    ckpt = load_checkpoint(run)
    assert ckpt["backbone"]["qs.linear.weight"].shape == (1, 513)
    # The checkpoint of a torch backbone with a norm head exports (it was rebuilt with a linear head and failed).
    from crfiqa.training.export import export_checkpoint

    export_checkpoint(str(run / "latest.pt"), str(tmp_path / "norm_head.onnx"))
    assert {o.name for o in ort.InferenceSession(str(tmp_path / "norm_head.onnx")).get_outputs()} >= {"quality", "embedding"}
    # Another model's clean pass left in a fresh run's folder is not reused (it set that run's CR centres).
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "clean_embeddings.pt", other / "clean_embeddings.pt")
    cfg = _config(tmp_path, data=str(REC), backbone="mobilefacenet", quality_head="norm", qs_init="ridge",
                  cr_centres="loo", head_init="class_means", seed=7)
    train_main(["--config", str(cfg), "--max-steps", "1", "--out", str(other)])
    first, second = (torch.load(r / "clean_embeddings.pt", weights_only=True) for r in (run, other))
    assert first["key"] != second["key"] and not torch.equal(first["embeddings"], second["embeddings"])


def test_anchor_calibration_meets_its_targets() -> None:
    from crfiqa.service.facemodel import calibrate
    from crfiqa.training.calibrate import anchor_sets, fit_anchor_calibration

    rng = np.random.default_rng(0)
    good, low, blurred = rng.normal(0.62, 0.03, 400), rng.normal(0.40, 0.05, 400), rng.normal(0.52, 0.04, 400)
    cal = fit_anchor_calibration(good, [low, blurred], good_target=80, bad_target=12)
    assert calibrate(good, cal).mean() == pytest.approx(80, abs=0.05)
    assert max(calibrate(low, cal).mean(), calibrate(blurred, cal).mean()) == pytest.approx(12, abs=0.05)
    with pytest.raises(ValueError, match="above"):
        fit_anchor_calibration(low, [good])
    # The widest such logistic: 5 % wider, no centre meets both targets any more.
    from crfiqa.service.registry import Calibration

    wider = cal.scale * 1.05
    both = [c for c in np.linspace(0.3, 0.8, 2001)
            if calibrate(good, Calibration(c, wider)).mean() >= 80 - 1e-6
            and max(calibrate(low, Calibration(c, wider)).mean(), calibrate(blurred, Calibration(c, wider)).mean()) <= 12 + 1e-6]
    assert not both
    overlapping = rng.normal(0.61, 0.03, 400)  # the bad set almost as good as the good one: no logistic separates them
    with pytest.raises(ValueError, match="no logistic"):
        fit_anchor_calibration(good, [overlapping], good_target=80, bad_target=12)
    crops = _fixture_crops_rgb()
    sets = anchor_sets(crops)
    assert set(sets) == {"good", "eye10px", "blur3"} and all(v.shape == crops.shape for v in sets.values())
    # Lost detail: the 10-px and blurred versions have far less high-frequency energy than the originals.
    lap = lambda x: np.mean([np.var(np.diff(c.astype(float), axis=0)) for c in x])  # noqa: E731
    assert lap(sets["eye10px"]) < 0.4 * lap(crops) and lap(sets["blur3"]) < 0.4 * lap(crops)


def _fixture_crops_rgb(n: int = 6) -> np.ndarray:
    rec = RecordIO(REC)
    return np.stack([decode_image(rec.read(k).image).rgb for k in rec.image_keys()[:n]])


def test_feature_stats_head_sees_the_norm_and_channel_statistics() -> None:
    from crfiqa.training.heads import FeatureStatsHead, build_quality_head

    rng = np.random.default_rng(0)
    emb = torch.tensor(rng.normal(size=(5, 8)), dtype=torch.float32)
    maps = [torch.tensor(rng.normal(size=(5, 3, 4, 4)), dtype=torch.float32),
            torch.tensor(rng.normal(2.0, 3.0, size=(5, 2, 7, 7)), dtype=torch.float32)]
    feats = FeatureStatsHead.features(emb, maps).numpy()
    norm = np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    columns = [emb.numpy() / norm, np.log(norm)]
    for m in maps:
        columns += [m.numpy().mean((2, 3)), m.numpy().std((2, 3))]
    by_hand = np.concatenate(columns, axis=1)
    np.testing.assert_allclose(feats, by_hand, rtol=1e-5, atol=1e-5)
    head = build_quality_head("feature_stats", 8, [3, 2])
    assert head(emb, maps).shape == (5, 1) and head.linear.in_features == 8 + 1 + 2 * 5
    with pytest.raises(ValueError, match="channel counts"):
        build_quality_head("feature_stats", 8)


def test_identity_folds_partition_identities_and_fold_heads_see_only_their_faces() -> None:
    from crfiqa.training.closed_form import cr_targets, fit_head, identity_folds
    from crfiqa.training.config import TrainConfig

    names = [f"id{k % 7}" for k in range(40)]
    folds = identity_folds(names, 3, seed=5)
    assert np.array_equal(folds, identity_folds(names, 3, seed=5))  # seeded
    assert not np.array_equal(folds, identity_folds(names, 3, seed=6))
    for who in set(names):  # an identity is in exactly one fold
        assert len({int(f) for n, f in zip(names, folds) if n == who}) == 1
    assert sorted(np.bincount([int(f) for f in {n: f for n, f in zip(names, folds)}.values()])) == [2, 2, 3]

    # A fold's head: CR from the kept faces alone. Kept labels need not be contiguous; the held-out
    # identities are no one's nearest negative centre.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(4)
    embs = [torch.randn(24, 8, generator=g) + 3 * torch.eye(8)[labels] for _ in range(2)]
    feats = [torch.randn(24, 5, generator=g) for _ in range(2)]
    keep = labels != 2
    cfg = TrainConfig(ridge_alpha=0.1)
    lin = torch.nn.Linear(5, 1)
    _, targets = fit_head(lin, cfg, [e[keep] for e in embs], [f[keep] for f in feats], labels[keep])
    contiguous = torch.where(labels[keep] > 2, labels[keep] - 1, labels[keep])
    alone = torch.cat(cr_targets([e[keep] for e in embs], contiguous, 5, cfg.cr_target))
    everyone = torch.cat([t[keep] for t in cr_targets(embs, labels, 6, cfg.cr_target)])
    assert torch.allclose(targets, alone)
    assert not torch.allclose(targets, everyone)  # identity 2 would have been a negative centre
    again = torch.nn.Linear(5, 1)
    fit_head(again, cfg, [e[keep] for e in embs], [f[keep] for f in feats], contiguous)
    assert torch.allclose(lin.weight, again.weight) and torch.allclose(lin.bias, again.bias)
    # An identity left with one face has no leave-one-out centre: its rows are left out of the fit, which
    # equals the fit without that identity (it used to stop the fit with a ValueError after the feature pass).
    lone = labels != 4
    lone[16] = True  # the first of identity 4's four faces (rows 16-19)
    single = torch.nn.Linear(5, 1)
    _, single_targets = fit_head(single, cfg, [e[lone] for e in embs], [f[lone] for f in feats], labels[lone])
    without = lone & (labels != 4)
    reference = torch.nn.Linear(5, 1)
    _, reference_targets = fit_head(reference, cfg, [e[without] for e in embs], [f[without] for f in feats],
                                    labels[without])
    assert torch.allclose(single_targets, reference_targets) and torch.allclose(single.weight, reference.weight)


@pytest.mark.slow
def test_closed_form_fit_is_ridge_resumes_from_shards_and_exports(tmp_path: Path) -> None:
    from crfiqa.training.closed_form import training_set
    from crfiqa.training.config import TrainConfig
    from crfiqa.training.export import export_checkpoint
    from crfiqa.training.losses import LeaveOneOutCentres
    from crfiqa.training.train import build_model

    init = tmp_path / "mbf.onnx"
    shutil.copy(MBF, init)
    cfg = _config(tmp_path, init_backbone=str(init), mode="closed_form", quality_head="feature_stats",
                  taps=["397", "509"], augment=["flip", "always_degrade"], augment_copies=1, ridge_alpha=0.01,
                  batch_size=16)
    run = tmp_path / "run"
    train_main(["--config", str(cfg), "--out", str(run)])
    shards = sorted((run / "features").glob("*.pt"))
    assert [p.name for p in shards] == ["copy00_00000.pt", "copy01_00000.pt"]
    ckpt = load_checkpoint(run / "latest.pt")
    weight = ckpt["backbone"]["qs.linear.weight"]
    assert weight.shape == (1, 512 + 1 + 2 * (128 + 512))

    # The fit is the ridge regression of the leave-one-out CR of both copies on the saved features.
    parts = [torch.load(p, weights_only=True) for p in shards]
    labels = torch.tensor([label for _, label in training_set(TrainConfig(**ckpt["config"])).samples])
    loo = LeaveOneOutCentres(parts[0]["embedding"], labels, int(labels.max()) + 1)
    index = torch.arange(len(labels))
    y = torch.cat([certainty_target(loo.cosines(p["embedding"], index, labels), labels)[0] for p in parts]).double().numpy()
    x = torch.cat([p["features"] for p in parts]).double().numpy()
    mu, sd = x.mean(0), x.std(0, ddof=1).clip(1e-8)
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + 0.01 * len(z) * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    np.testing.assert_allclose(x @ weight.double().numpy()[0] + float(ckpt["backbone"]["qs.linear.bias"]),
                               z @ w + y.mean(), atol=1e-4)
    assert json.loads((run / "fit.json").read_text())["rows"] == 2 * len(labels)

    # Resume: a lost shard is recomputed (the same seeded degradations), the others are reused.
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    train_main(["--config", str(cfg), "--out", str(run)])
    assert shards[0].stat().st_mtime_ns == kept and shards[1].exists()
    assert torch.allclose(load_checkpoint(run / "latest.pt")["backbone"]["qs.linear.weight"], weight, atol=1e-6)
    # --resume naming this run is what it does anyway; naming another run would be ignored: refused.
    train_main(["--config", str(cfg), "--out", str(run), "--resume", str(run / "latest.pt")])
    with pytest.raises(ValueError, match="its own out"):
        train_main(["--config", str(cfg), "--out", str(run), "--resume", str(tmp_path / "elsewhere")])

    # Features made with other settings are refused, not silently reused.
    (tmp_path / "other").mkdir()
    other = _config(tmp_path / "other", init_backbone=str(init), mode="closed_form", quality_head="feature_stats",
                    taps=["509"], augment=["flip", "always_degrade"], augment_copies=1, batch_size=16)
    with pytest.raises(ValueError, match="other taps"):
        train_main(["--config", str(other), "--out", str(run)])
    fewer = _config(tmp_path / "other", init_backbone=str(init), mode="closed_form", quality_head="feature_stats",
                    taps=["397", "509"], augment=["flip", "always_degrade"], augment_copies=1, ridge_alpha=0.01,
                    batch_size=16, max_per_identity=2)  # other faces, same settings otherwise
    with pytest.raises(ValueError, match=r"other .*faces"):
        train_main(["--config", str(fewer), "--out", str(run)])

    # Exported, the graph gives the torch model's quality on real faces.
    out = export_checkpoint(str(run / "latest.pt"), str(tmp_path / "q.onnx"))
    assert out["parity"] <= 1e-4
    model = build_model(TrainConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["backbone"])
    crops = _fixture_crops_rgb()
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(to_blob(crops))).quality.numpy()[:, 0]
    p, entry = resolve(str(tmp_path / "q.onnx"), "quality")
    assert np.abs(QualityModel(p, entry, ("CPUExecutionProvider",)).predict(crops) - ref).max() <= 1e-4

    # Another network saved at the same path makes other features: refused, though no setting changed.
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(init))
    weight = next(t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(graph, str(init))
    with pytest.raises(ValueError, match=r"other .*weights"):
        train_main(["--config", str(cfg), "--out", str(run)])

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
from crfiqa.training.config import load_config
from crfiqa.training.convert_official import load_official
from crfiqa.training.data import open_dataset
from crfiqa.training.data.folder import folder_samples
from crfiqa.training.data.recordio import RecordIO, write_rec
from crfiqa.training.export import check_parity, export_onnx, fit_calibration
from crfiqa.training.losses import ArcFaceHead, CRFIQALoss, certainty_target
from crfiqa.training.train import load_checkpoint, main as train_main
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
    assert x.shape == (3, 112, 112) and -1.0 <= x.min() and x.max() <= 1.0


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


@pytest.mark.slow
def test_torchrun_gloo_ranks_stay_identical(tmp_path: Path) -> None:
    cfg = _config(tmp_path, batch_size=4)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crfiqa.training.train", "--config", str(cfg), "--max-steps", "4",
                        "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) weights_sha256 ([0-9a-f]{64})", r.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert len(_losses(tmp_path / "ddp")) == 4  # only rank 0 writes


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

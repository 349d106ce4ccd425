"""Export: PReLU kept as PRelu, BatchNorm folded, optimised graph = unoptimised on real faces, re-optimising an
existing export, the sidecar written by a TOML writer, the one state-dict check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from crfiqa.service.pipeline import Options
from crfiqa.service.registry import Calibration, resolve, sha256_file
from crfiqa.training.backbones import create_backbone
from crfiqa.training.backbones.base import QualityNet
from crfiqa.training.backbones.onnx_import import OnnxBackbone
from crfiqa.training.checkpoint import fit_state_dict, load_state_dict_checked
from crfiqa.training.export import (
    check_parity,
    export_onnx,
    export_raw,
    onnx_quality,
    reoptimise,
    write_sidecar,
)
from crfiqa.training.optimise import max_difference, op_counts, optimise_onnx, probe_inputs
from tests.helpers import SHARED_MODELS, lfw_dev_images

MBF = SHARED_MODELS / "fr" / "insightface_w600k_mbf.onnx"
SOURCE_NODES = len(onnx.load(str(MBF)).graph.node)
#: The export has the source's nodes plus the qs Gemm; allow a couple more, not the 2x of the old export.
NODE_SLACK = 2


@pytest.fixture(scope="module")
def faces(pipeline) -> np.ndarray:
    """Aligned RGB crops of 24 LFW dev images (one face each, centre rule), through the service pipeline."""
    crops = [p.crops[:1] for _, p in pipeline.run(lfw_dev_images(24), Options(select="center"), score=False)]
    out = np.concatenate([c for c in crops if len(c)])
    assert len(out) >= 20
    return out


@pytest.fixture(scope="module")
def mbf_model() -> OnnxBackbone:
    """w600k_mbf imported into torch with a (seeded) non-trivial quality head."""
    torch.manual_seed(0)
    model = create_backbone(f"onnx:{MBF}")
    nn.init.normal_(model.qs.weight, std=0.05)
    return model.eval()


class _WherePReLU(nn.Module):
    """The importer's PReLU before it built nn.PReLU: exports as GreaterOrEqual/Where/Mul."""

    def __init__(self, slope: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, x * self.weight)


def _old_style(model: OnnxBackbone) -> OnnxBackbone:
    """A copy of ``model`` whose PReLUs are the old Where form, weights [C,1,1] as the old checkpoints hold."""
    old = create_backbone(f"onnx:{MBF}")
    old.load_state_dict(model.state_dict())
    for i, module in enumerate(old.graph.nodes):
        if isinstance(module, nn.PReLU):
            old.graph.nodes[i] = _WherePReLU(module.weight.detach().clone().reshape(-1, 1, 1))
    return old.eval()


def test_importer_builds_prelu_and_loads_old_slope_shapes(mbf_model: OnnxBackbone) -> None:
    prelus = [m for m in mbf_model.graph.nodes if isinstance(m, nn.PReLU)]
    assert len(prelus) == op_counts(MBF)["PRelu"] == 34
    old_state = _old_style(mbf_model).state_dict()
    first = next(i for i, m in enumerate(mbf_model.graph.nodes) if isinstance(m, nn.PReLU))
    assert old_state[f"graph.nodes.{first}.weight"].shape == (prelus[0].num_parameters, 1, 1)
    fresh = create_backbone(f"onnx:{MBF}")
    fresh.load_state_dict(old_state)  # [C,1,1] slopes of old checkpoints are reshaped on load
    x = torch.from_numpy(probe_inputs(onnx.load(str(MBF)))[0])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x).embedding, mbf_model(x).embedding)


def test_export_keeps_prelu_folds_batchnorm_and_stays_small(tmp_path: Path, mbf_model: OnnxBackbone,
                                                            faces: np.ndarray) -> None:
    raw = export_raw(mbf_model, tmp_path / "raw.onnx")
    assert op_counts(raw).get("BatchNormalization") == 1  # the embedding BN after the Gemm: torch leaves it
    path = export_onnx(mbf_model, tmp_path / "q.onnx", crops=faces)
    ops = op_counts(path)
    assert ops["PRelu"] == 34
    assert not {"BatchNormalization", "Where", "GreaterOrEqual", "Mul"} & set(ops), ops
    assert sum(ops.values()) <= SOURCE_NODES + NODE_SLACK
    assert check_parity(mbf_model, path, faces) <= 1e-4


def test_optimised_scores_equal_unoptimised_on_real_faces(tmp_path: Path, mbf_model: OnnxBackbone,
                                                          faces: np.ndarray) -> None:
    raw = export_raw(mbf_model, tmp_path / "raw.onnx")
    opt = export_onnx(mbf_model, tmp_path / "opt.onnx", crops=faces)
    q_raw, q_opt = onnx_quality(raw, faces), onnx_quality(opt, faces)
    assert q_raw.std() > 1e-3  # a head that tells faces apart, so equality means something
    assert np.abs(q_raw - q_opt).max() <= 1e-4
    from crfiqa.service.preprocess import to_blob

    assert max_difference(raw, opt, [to_blob(faces)]) <= 1e-4  # both outputs, embeddings included


def test_reoptimise_old_export_through_the_cli(tmp_path: Path, mbf_model: OnnxBackbone, faces: np.ndarray) -> None:
    old = export_raw(_old_style(mbf_model), tmp_path / "old.onnx")
    assert {"Where", "GreaterOrEqual"} <= set(op_counts(old))
    write_sidecar(old, "old", "onnx:w600k_mbf", Calibration(0.5, 0.04), {"data": "lfw"}, "research only")
    out = tmp_path / "new" / "new.onnx"
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "export", str(old), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["optimised"]["prelu_rewritten"] == 34 and report["optimised"]["batchnorm_folded"] == 1
    assert report["optimised"]["nodes_after"] <= SOURCE_NODES + NODE_SLACK < report["optimised"]["nodes_before"]
    assert "Where" not in op_counts(out)
    assert np.abs(onnx_quality(out, faces) - onnx_quality(old, faces)).max() <= 1e-4
    _p, entry = resolve(str(out), "quality")  # the carried-over sidecar verifies the new file
    assert entry.calibration == Calibration(0.5, 0.04) and entry.sha256 == sha256_file(out)
    assert entry.provenance["data"] == "lfw" and entry.provenance["optimised_from"].startswith("old.onnx")


def test_reoptimise_refuses_a_graph_outside_the_contract(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contract"):
        reoptimise(MBF, tmp_path / "x.onnx")


def _conv_bn_model(path: Path) -> Path:
    """Conv -> BatchNormalization -> Gemm -> BatchNormalization, with non-trivial statistics."""
    rng = np.random.default_rng(1)

    def init(name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
        a = rng.uniform(0.5, 2.0, shape) if positive else rng.normal(0, 1, shape)
        return numpy_helper.from_array(a.astype(np.float32), name)

    inits = [init("cw", 4, 3, 3, 3), init("g1", 4, positive=True), init("b1", 4), init("m1", 4),
             init("v1", 4, positive=True), init("gw", 5, 4 * 6 * 6), init("gb", 5), init("g2", 5, positive=True),
             init("b2", 5), init("m2", 5), init("v2", 5, positive=True)]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[0, 0, 0, 0]),
             helper.make_node("BatchNormalization", ["c", "g1", "b1", "m1", "v1"], ["bn1"], epsilon=1e-3),
             helper.make_node("Flatten", ["bn1"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["gm"], transB=1),
             helper.make_node("BatchNormalization", ["gm", "g2", "b2", "m2", "v2"], ["y"])]
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_batchnorm_folds_into_conv_and_gemm_exactly(tmp_path: Path) -> None:
    src = _conv_bn_model(tmp_path / "bn.onnx")
    report = optimise_onnx(src, tmp_path / "bn_opt.onnx")
    assert report.batchnorm_folded == 2 and "BatchNormalization" not in op_counts(tmp_path / "bn_opt.onnx")
    x = np.random.default_rng(2).normal(0, 3, (7, 3, 8, 8)).astype(np.float32)
    assert max_difference(src, tmp_path / "bn_opt.onnx", [x]) <= 1e-5


def test_optimise_refuses_when_parity_breaks(tmp_path: Path) -> None:
    src = _conv_bn_model(tmp_path / "bn.onnx")
    with pytest.raises(ValueError, match="differs"):
        optimise_onnx(src, tmp_path / "bn_opt.onnx", tolerance=-1.0)
    assert not (tmp_path / "bn_opt.onnx").exists()


def test_sidecar_toml_round_trips_quotes_and_backslashes(tmp_path: Path, channel_model: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(channel_model.read_bytes())
    data = 'C:\\faces\\"best" set\\' + "\n2nd line"
    write_sidecar(path, 'name "q"', "mobilefacenet", Calibration(0.123456789, 0.0375), {"data": data, "step": 7},
                  licence='it\'s "research"')
    _, entry = resolve(str(path), "quality")
    assert entry.name == 'name "q"' and entry.licence == 'it\'s "research"'
    assert entry.provenance["data"] == data and entry.provenance["step"] == "7"
    assert entry.calibration == Calibration(0.123457, 0.0375)


class _Tiny(QualityNet):
    def __init__(self) -> None:
        super().__init__(4)
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)


def test_one_state_dict_check_lists_every_problem() -> None:
    model = _Tiny()
    good = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(fit_state_dict(model, good)) == {k.removeprefix("module.") for k in good}
    bad = dict(good)
    del bad["module.qs.weight"]
    bad["module.head.kernel"] = torch.zeros(1)
    bad["module.fc.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError) as e:
        fit_state_dict(model, bad, "ckpt.pth")
    msg = str(e.value)
    assert "ckpt.pth" in msg and "'qs.weight'" in msg and "'head.kernel'" in msg and "'fc.weight'" in msg
    with pytest.raises(ValueError, match="state dict of tensors"):
        fit_state_dict(model, {"fc.weight": [1, 2]})
    # excluded keys are neither required nor loaded: the model keeps its own qs
    fresh = _Tiny()
    before = fresh.qs.weight.detach().clone()
    no_qs = {k: v for k, v in good.items() if ".qs." not in k and not k.startswith("module.qs")}
    load_state_dict_checked(fresh, {**no_qs, "module.qs.weight": torch.ones(1, 4)}, exclude=("qs.",))
    assert torch.equal(fresh.qs.weight, before) and torch.equal(fresh.fc.weight, model.fc.weight)


def test_train_and_convert_use_the_one_check(tmp_path: Path) -> None:
    from crfiqa.training.convert_official import load_official
    from crfiqa.training.train import load_init_backbone

    state = create_backbone("iresnet18").state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"does not fit IResNet: .*wrong shapes \['fc.weight'\]"):
        load_init_backbone(create_backbone("iresnet18"), str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match=r"not a CR-FIQA iresnet50 checkpoint: .*does not fit IResNet"):
        load_official(tmp_path / "bad.pth", "iresnet50")


def test_float16_copy_keeps_float32_io_and_scores(tmp_path: Path, faces: np.ndarray) -> None:
    from crfiqa.service.facemodel import QualityModel
    from crfiqa.training.optimise import to_float16

    path, entry = resolve("crfiqa_mbf", "quality")
    path16 = to_float16(path, tmp_path / "q16.onnx")
    assert path16.stat().st_size < 0.6 * path.stat().st_size  # the weights really are half precision
    q32 = QualityModel(path, entry, ("CPUExecutionProvider",))
    q16 = QualityModel(path16, entry, ("CPUExecutionProvider",))
    s32, s16 = q32.score(q32.predict(faces)), q16.score(q16.predict(faces))
    assert q16.session.get_inputs()[0].type == "tensor(float)"
    assert 0 < np.abs(s32 - s16).max() <= 2.0  # not exact (a copy would give 0), within 2 points of 100

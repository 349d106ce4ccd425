"""Evaluation: metrics on hand-computed cases, bootstrap behaviour, protocols, degrade, an end-to-end run."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crfiqa.evaluation.degradations import apply_chain
from crfiqa.evaluation.degrade import degrade_dataset, recorded_steps
from crfiqa.evaluation.evaluate import Pairs, Settings, evaluate, pair_scores
from crfiqa.evaluation.metrics import (
    edc_iso,
    erc_paper,
    fnmr,
    halving_discard,
    pauc,
    threshold_at_fmr,
    threshold_at_fnmr,
    trapezoid,
    value_at,
    verification_accuracy,
)
from crfiqa.evaluation.protocols import all_vs_all, lfw_pairs, load_bin
from crfiqa.service.imaging import read_image
from tests.helpers import LFW, SHARED, SHARED_MODELS

FIXTURES = SHARED / "data" / "fixtures"


# ---------------------------------------------------------------- thresholds and FNMR

def test_threshold_at_fmr_by_hand() -> None:
    imp = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])  # sorted desc: .9 .8 ... 0
    assert threshold_at_fmr(imp, 0.1) == 0.8  # k = 1 -> s(2); exactly 1 of 10 impostors (0.9) is > t
    assert threshold_at_fmr(imp, 0.25) == 0.7  # k = floor(2.5) = 2 -> s(3)
    assert threshold_at_fmr(imp, 0.01) == 0.9  # k = 0 -> the top score: no impostor matches
    assert threshold_at_fmr(imp, 1.0) == 0.0  # k >= n -> s(n)
    assert np.mean(imp > threshold_at_fmr(imp, 0.3)) == pytest.approx(0.3)


def test_fnmr_counts_ties_as_non_matches() -> None:
    assert fnmr(np.array([0.5, 0.6, 0.7, 0.8]), 0.6) == 0.5
    assert threshold_at_fnmr(np.array([0.4, 0.1, 0.3, 0.2]), 0.5) == 0.2
    assert fnmr(np.array([0.4, 0.1, 0.3, 0.2]), threshold_at_fnmr(np.array([0.4, 0.1, 0.3, 0.2]), 0.0)) == 0.0


# ---------------------------------------------------------------- paper protocol

def _toy():
    # 4 genuine (two errors below t) and 6 impostors; quality ranks the errors lowest.
    scores = np.array([0.2, 0.9, 0.1, 0.8, 0.3, 0.4, 0.35, 0.5, 0.45, 0.05])
    genuine = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    quality = np.array([0.1, 0.9, 0.2, 0.8, 0.5, 0.6, 0.7, 0.3, 0.4, 0.95])
    return scores, genuine, quality


def test_paper_erc_fixed_by_hand() -> None:
    s, g, q = _toy()
    ratios = np.array([0.0, 0.1, 0.2, 0.3])
    curve = erc_paper(s, g, q, fmr=1 / 6, threshold_mode="fixed", ratios=ratios)
    t = threshold_at_fmr(s[~g], 1 / 6)  # impostors desc .5 .45 .4 .35 .3 .05, k = 1 -> 0.45
    assert t == 0.45
    # quality order: 0(.1,err) 2(.2,err) 7(.3) 8(.4) 4(.5) ...; reject 0, 1, 2, 3 pairs
    assert list(curve.y) == pytest.approx([2 / 4, 1 / 3, 0.0, 0.0])
    assert curve.auc == pytest.approx(trapezoid(curve.y, ratios))


def test_paper_erc_per_step_recomputes_threshold() -> None:
    s, g, q = _toy()
    ratios = np.array([0.0, 0.3, 0.4])
    curve = erc_paper(s, g, q, fmr=1 / 6, threshold_mode="per-step", ratios=ratios)
    # at r=0.4 pairs 0,2,7,8 are gone: kept impostors .3 .4 .35 .05 -> k = floor(4/6) = 0 -> t = .4
    assert curve.threshold is None and curve.y[2] == 0.0


def test_paper_erc_rejects_a_tied_level_in_proportion() -> None:
    """Half of a tied level rejected keeps half its genuine pairs and half its errors, whichever is listed first
    (input order rejected the genuine error first: FNMR 0.0, a gain no quality earned)."""
    s = np.array([0.1, 0.9, 0.2, 0.3])
    g = np.array([1, 1, 0, 0], bool)
    q = np.array([0.5, 0.5, 0.9, 0.9])  # t at FMR 0.5 = 0.2: pair 0 is a false non-match
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        c = erc_paper(s[order], g[order], q[order], 0.5, "fixed", np.array([0.0, 0.25]))
        assert list(c.y) == [0.5, 0.5]


def test_an_uninformative_quality_has_a_flat_erc_whatever_the_listing_order() -> None:
    """A constant quality (every pair tied) rejects nothing it knows about: FNMR stays at its start, and the
    AUC is FNMR(0) x 0.95, with genuine pairs listed first (as all-vs-all does) or last."""
    rng = np.random.default_rng(3)
    genuine = np.r_[np.ones(500, bool), np.zeros(20_000, bool)]
    scores = np.where(genuine, rng.normal(0.6, 0.2, genuine.size), rng.normal(0.0, 0.1, genuine.size))
    flat = np.zeros(genuine.size)
    for order in (np.arange(genuine.size), np.arange(genuine.size)[::-1]):
        c = erc_paper(scores[order], genuine[order], flat, 1e-3, "fixed")
        assert c.auc == pytest.approx(c.y[0] * 0.95, rel=1e-9) and np.allclose(c.y, c.y[0])
    per_step = erc_paper(scores, genuine, flat, 1e-3, "per-step")
    assert abs(per_step.auc - per_step.y[0] * 0.95) < 0.25 * per_step.y[0]  # random tie order: near flat


# ---------------------------------------------------------------- ISO EDC

def test_edc_discards_equal_qualities_together() -> None:
    s = np.array([0.1, 0.2, 0.9, 0.8, 0.7])
    q = np.array([0.3, 0.3, 0.5, 0.6, 0.6])  # two errors (t = 0.5) share the lowest quality
    curve = edc_iso(s, q, threshold=0.5)
    assert list(curve.x) == pytest.approx([0.0, 0.4, 0.6, 1.0])
    assert list(curve.y) == pytest.approx([0.4, 0.0, 0.0, 0.0])
    assert pauc(curve, 0.2) == pytest.approx(0.4 * 0.2)
    assert pauc(curve, 0.5) == pytest.approx(0.4 * 0.4)
    assert value_at(curve, 0.05) == 0.4 and value_at(curve, 0.45) == 0.0
    assert halving_discard(curve) == pytest.approx(0.4)


def test_verification_accuracy_by_hand() -> None:
    acc, t = verification_accuracy(np.array([0.9, 0.8, 0.3, 0.2, 0.85]), np.array([1, 1, 0, 0, 0], bool))
    assert acc == pytest.approx(0.8) and t == pytest.approx(0.3)


# ---------------------------------------------------------------- bootstrap

def _synthetic(n_ids: int, seed: int = 0) -> Pairs:
    rng = np.random.default_rng(seed)
    per = 4
    gen_q = rng.random(n_ids * per)
    gen_s = 0.3 + 0.5 * gen_q + rng.normal(0, 0.15, gen_q.size)  # low quality -> low score
    imp_s = rng.normal(0.0, 0.1, n_ids * 20)
    scores = np.r_[gen_s, imp_s]
    genuine = np.r_[np.ones(gen_s.size, bool), np.zeros(imp_s.size, bool)]
    own = np.repeat(np.arange(n_ids), per)
    cluster = np.r_[np.stack([own, own], 1), rng.integers(0, n_ids, (imp_s.size, 2))]
    q = np.r_[gen_q, rng.random(imp_s.size)]
    return Pairs(scores, genuine, cluster, {"good": q, "random": rng.random(q.size), "same": q.copy()})


def test_bootstrap_interval_shrinks_with_data() -> None:
    settings = Settings(fmrs=(0.01,), protocols=("iso",), pauc_limits=(0.2,), bootstrap=200)
    widths = []
    for n in (25, 400):
        e = evaluate(_synthetic(n), settings)["results"]["0.01"]["iso"]["methods"]["good"]["pauc"]["0.2"]
        widths.append(e["ci95"][1] - e["ci95"][0])
    assert widths[1] < widths[0] / 2


def test_method_against_itself_is_exactly_zero_and_good_beats_random() -> None:
    settings = Settings(fmrs=(0.01,), protocols=("iso", "paper"), threshold_mode="fixed", pauc_limits=(0.2,),
                        bootstrap=200)
    res = evaluate(_synthetic(300), settings)["results"]["0.01"]
    same = res["iso"]["differences"]["0.2"]["good - same"]
    assert same["ci95"] == [0.0, 0.0] and same["diff"] == 0.0
    assert res["iso"]["differences"]["0.2"]["good - random"]["a_better"]
    assert res["paper"]["differences"]["good - random"]["a_better"]
    assert res["paper"]["differences"]["good - same"]["ci95"] == [0.0, 0.0]


def test_threshold_guidance_by_hand() -> None:
    from crfiqa.evaluation.evaluate import threshold_guidance

    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.3])  # genuine pairs 0-2, impostors 3-4
    genuine = np.array([1, 1, 1, 0, 0], bool)
    left, right = np.array([0, 2, 4, 0, 1]), np.array([1, 3, 5, 2, 3])
    image_scores = np.array([80.0, 90.0, 15.0, 50.0, 70.0, 60.0])  # image 2 scores 15
    rows = threshold_guidance(scores, left, right, genuine, image_scores, fmr=0.5, thresholds=[10, 20, 75])
    # t = 0.2 (impostors .3 .2, k = 1): pair 1 (images 2,3; score .1) is the one error
    assert rows[0] == {"score_threshold": 10, "images_rejected": 0.0, "genuine_kept": 3, "fnmr": pytest.approx(1 / 3)}
    assert rows[1]["images_rejected"] == pytest.approx(1 / 6) and rows[1]["genuine_kept"] == 2 and rows[1]["fnmr"] == 0
    assert rows[2]["genuine_kept"] == 1  # only images 0, 1 (80, 90) kept


def test_failures_score_minus_infinity() -> None:
    emb = np.array([[1.0, 0.0], [np.nan, np.nan], [0.6, 0.8]])
    s = pair_scores(emb, np.array([0, 0]), np.array([1, 2]))
    assert s[0] == -np.inf and s[1] == pytest.approx(0.6)


def test_few_impostors_warns() -> None:
    p = _synthetic(10)
    res = evaluate(p, Settings(fmrs=(1e-3,), protocols=("iso",), bootstrap=0))["results"]["0.001"]
    assert "not statistically meaningful" in res["warning"]


# ---------------------------------------------------------------- protocols

def test_lfw_pairs_parsing() -> None:
    p = lfw_pairs(LFW / "dev_pairs.txt", LFW / "images")
    assert p.left.size == 1000 and p.genuine.sum() == 500 and not p.genuine[500:].any()
    first = (LFW / "dev_pairs.txt").read_text().splitlines()[1].split()
    assert p.names[p.left[0]] == f"{first[0]}/{first[0]}_{int(first[1]):04d}.jpg"
    assert all(Path(s).is_file() for s in p.sources)


def test_lfw_pairs_rejects_bad_header(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello world\nA 1 2\n")
    with pytest.raises(ValueError, match="folds"):
        lfw_pairs(tmp_path / "p.txt", tmp_path)


def test_all_vs_all_counts(tmp_path: Path) -> None:
    for ident, n in [("a", 3), ("b", 2), ("c", 1)]:
        (tmp_path / ident).mkdir()
        for k in range(n):
            (tmp_path / ident / f"{k}.jpg").write_bytes(b"x")
    p = all_vs_all(tmp_path)
    assert p.genuine.sum() == 3 + 1 and (~p.genuine).sum() == 15 - 4
    assert all_vs_all(tmp_path, max_impostors=5, seed=1).left.size == 4 + 5


def test_verification_bin_fixture() -> None:
    expected = json.loads((FIXTURES / "verification_expected.json").read_text())
    p = load_bin(FIXTURES / "verification.bin")
    assert list(p.genuine) == expected["issame"]
    assert [hashlib.sha256(b).hexdigest() for b in p.sources] == expected["jpeg_sha256"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_rejected(tmp_path: Path) -> None:
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([b"x", b"y"], [_Evil()]), protocol=2))
    with pytest.raises(ValueError, match="refused"):
        load_bin(tmp_path / "evil.bin")
    (tmp_path / "shape.bin").write_bytes(pickle.dumps(([b"x"], [True]), protocol=3))  # BINBYTES: no globals
    with pytest.raises(ValueError, match="issame"):
        load_bin(tmp_path / "shape.bin")


# ---------------------------------------------------------------- degrade

@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("set")
    multi = [p for p in sorted((LFW / "images").iterdir()) if p.is_dir() and len(list(p.iterdir())) >= 2]
    for ident in multi[:6]:
        (root / ident.name).mkdir()
        for img in sorted(ident.iterdir())[:2]:
            (root / ident.name / img.name).write_bytes(img.read_bytes())
    (root / "notes.txt").write_text("kept as is\n")
    return root


def test_degrade_is_reproducible_and_recorded(small_set: Path, tmp_path: Path, pipeline) -> None:
    a = degrade_dataset(small_set, tmp_path / "a", seed=7, fraction=0.5, pipeline=pipeline)
    degrade_dataset(small_set, tmp_path / "b", seed=7, fraction=0.5, pipeline=pipeline)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    rows = list(csv.DictReader((tmp_path / "a" / "degradations.csv").open()))
    assert a["degraded"] == sum(int(r["degraded"]) for r in rows) == round(0.5 * a["images"])
    assert (tmp_path / "a" / "notes.txt").read_text() == "kept as is\n"
    for row in rows:
        out = (tmp_path / "a" / row["path"]).read_bytes()
        if row["degraded"] == "0":
            assert out == (small_set / row["path"]).read_bytes()
            continue
        # Re-applying the recorded chain to the original gives the written image.
        from crfiqa.evaluation.degrade import write_image

        write_image(tmp_path / "again.jpg", apply_chain(read_image(small_set / row["path"]).rgb, recorded_steps(row)))
        assert (tmp_path / "again.jpg").read_bytes() == out
    c = degrade_dataset(small_set, tmp_path / "c", seed=8, fraction=0.5, pipeline=pipeline)
    assert c["degraded"] == a["degraded"]
    assert (tmp_path / "c" / "degradations.csv").read_text() != (tmp_path / "a" / "degradations.csv").read_text()


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_end_to_end_with_real_recognition_model(small_set: Path, tmp_path: Path) -> None:
    score_csv = tmp_path / "scores.csv"
    subprocess.run([sys.executable, "-m", "crfiqa.cli", "score", str(small_set), "--out", str(score_csv),
                    "--models-dir", str(SHARED_MODELS), "--quiet"], check=True, timeout=300)
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "evaluate", "--all-vs-all", str(small_set),
                        "--recognition", "w600k_mbf", "--quality", f"mbf_csv={score_csv}",
                        "--quality", "mbf_model=model:mbf_norm", "--baseline", "random", "sharpness",
                        "--guidance", "mbf_model",
                        "--fmr", "0.1", "--protocol", "both", "--threshold-mode", "fixed", "--bootstrap", "50",
                        "--models-dir", str(SHARED_MODELS), "--cache", str(tmp_path / "cache"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["images"] == 12 and report["recognition"]["accuracy"] > 0.9
    methods = report["results"]["0.1"]["iso"]["methods"]
    assert set(methods) == {"mbf_csv", "mbf_model", "random", "sharpness"}
    # The CSV written by `crfiqa score` and the model give the same ranking, hence the same curve.
    assert methods["mbf_csv"]["curve"] == methods["mbf_model"]["curve"]
    assert (out / "erc_fmr0.1.png").stat().st_size > 5000 and "| mbf_csv |" in (out / "summary.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 12
    guidance = report["guidance"]["0.1"]
    assert [g["score_threshold"] for g in guidance] == list(range(10, 100, 10))
    assert all(a["images_rejected"] <= b["images_rejected"] for a, b in itertools.pairwise(guidance))


@pytest.mark.parametrize("ties", [True, False], ids=["quality-ties", "continuous"])
def test_paper_bootstrap_equals_replicating_pairs(ties: bool) -> None:
    """The block-table bootstrap gives exactly the paper ERC's AUC on the pairs replicated by weight (a pair
    drawn k times is k tied copies: the copies straddling a cut are rejected in proportion, as erc_paper does)."""
    from crfiqa.evaluation.evaluate import BLOCK, paper_fixed_bootstrap

    rng = np.random.default_rng(5)
    n = 3 * BLOCK + 123
    scores = rng.random(n)
    quality = rng.integers(0, 50, n).astype(float) if ties else rng.random(n)
    genuine = rng.random(n) < 0.1
    cluster = rng.integers(0, 40, (n, 2))
    cluster[genuine, 1] = cluster[genuine, 0]  # a genuine pair's images share an identity
    draws = 2 * rng.integers(0, 3, (4, 40)).astype(float)  # even: every pair's weight is whole
    for d in draws:
        reps = ((d[cluster[:, 0]] + d[cluster[:, 1]]) // 2).astype(int)  # an impostor half each side's
        s, g, q = np.repeat(scores, reps), np.repeat(genuine, reps), np.repeat(quality, reps)
        t = threshold_at_fmr(s[~g], 0.01)
        (got,) = paper_fixed_bootstrap(scores, genuine, quality, t, cluster, d[None])
        assert got == pytest.approx(erc_paper(s, g, q, 0.01, "fixed").auc, abs=1e-12)
        # Which image a protocol lists first does not matter.
        (swapped,) = paper_fixed_bootstrap(scores, genuine, quality, t, cluster[:, ::-1], d[None])
        assert swapped == pytest.approx(got, abs=1e-12)


@pytest.mark.slow
def test_precomputed_embeddings_npz(small_set: Path, tmp_path: Path, pipeline) -> None:
    """--embeddings FILE.npz (paths relative to the image root) replaces the recognition model."""
    from crfiqa.evaluation.sources import embed, find_faces, recognition_model

    proto = all_vs_all(small_set)
    faces = find_faces(proto, pipeline, "center")
    emb = embed(faces, recognition_model("w600k_mbf", pipeline), False, None, "")
    np.savez(tmp_path / "emb.npz", paths=np.array(proto.names), embeddings=emb)
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "evaluate", "--all-vs-all", str(small_set),
                        "--images", str(small_set), "--embeddings", str(tmp_path / "emb.npz"), "--baseline", "random",
                        "--fmr", "0.1", "--bootstrap", "0", "--models-dir", str(SHARED_MODELS), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    expected, _ = verification_accuracy(pair_scores(emb, proto.left, proto.right), proto.genuine)
    assert report["recognition"]["accuracy"] == pytest.approx(expected)


def test_degrade_corrupt_image_is_an_error_row_and_the_run_goes_on(small_set: Path, tmp_path: Path, pipeline) -> None:
    src = tmp_path / "src"
    for p in small_set.rglob("*"):
        if p.is_file():
            (src / p.relative_to(small_set)).parent.mkdir(parents=True, exist_ok=True)
            (src / p.relative_to(small_set)).write_bytes(p.read_bytes())
    broken = next(p for p in sorted(src.rglob("*.jpg")))
    broken.write_bytes(b"not a jpeg")
    summary = degrade_dataset(src, tmp_path / "out", seed=3, fraction=1.0, pipeline=pipeline)
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "out" / "degradations.csv").open())}
    rel = broken.relative_to(src).as_posix()
    assert rows[rel]["degraded"] == "0" and rows[rel]["error"].startswith("unsupported_format")
    assert (tmp_path / "out" / rel).read_bytes() == b"not a jpeg"  # copied, nothing lost
    assert summary["errors"] == 1 and summary["degraded"] == summary["images"] - 1 == 11
    assert all(r["degraded"] == "1" for p, r in rows.items() if p != rel)


def test_ofiq_family_is_reproducible_and_shares_no_operator_with_training(small_set: Path, tmp_path: Path) -> None:
    from crfiqa.evaluation import syngen
    from crfiqa.evaluation.degradations import OPS

    a = degrade_dataset(small_set, tmp_path / "a", seed=5, fraction=0.5, family="ofiq")
    degrade_dataset(small_set, tmp_path / "b", seed=5, fraction=0.5, family="ofiq")
    rows = list(csv.DictReader((tmp_path / "a" / "degradations.csv").open()))
    assert a["degraded"] == 6 and a["family"] == "ofiq"
    for row in rows:
        out = (tmp_path / "a" / row["path"]).read_bytes()
        assert out == (tmp_path / "b" / row["path"]).read_bytes()
        if row["degraded"] == "1":
            steps = json.loads(row["steps"])
            assert steps and {s["name"] for s in steps} <= set(syngen.NAMES)
            assert sum(s["name"] in syngen.GEOMETRIC for s in steps) <= 1
            assert out != (small_set / row["path"]).read_bytes()
    # The training augmentation's operators (degradations.OPS) are none of the ofiq-syngen operators used:
    # Gaussian blur, noise, JPEG, exposure, resolution, roll/shift and occlusion components are excluded.
    from ofiq_syngen.components import COMPONENT_REGISTRY

    used = {COMPONENT_REGISTRY[c][i].function.__name__ for _, c, i in syngen.OPERATORS}
    excluded = {"Sharpness.scalar": [0, 2], "CompressionArtifacts.scalar": [0], "LuminanceMean.scalar": [0],
                "OverExposurePrevention.scalar": [0], "UnderExposurePrevention.scalar": [0],
                "InterEyeDistance.scalar": [0], "HeadSize.scalar": [0], "HeadPoseRoll.scalar": [0],
                "FaceOcclusionPrevention.scalar": [0]}
    assert used.isdisjoint({COMPONENT_REGISTRY[c][i].function.__name__ for c, ks in excluded.items() for i in ks})
    assert set(syngen.NAMES).isdisjoint(OPS)


def test_all_vs_all_caps_genuine_pairs_per_identity(tmp_path: Path) -> None:
    for ident, n in [("a", 6), ("b", 3)]:
        (tmp_path / ident).mkdir()
        for k in range(n):
            (tmp_path / ident / f"{k}.jpg").write_bytes(b"x")
    full = all_vs_all(tmp_path)
    capped = all_vs_all(tmp_path, max_genuine_per_identity=4, seed=2)
    assert full.genuine.sum() == 15 + 3 and capped.genuine.sum() == 4 + 3
    assert (~capped.genuine).sum() == (~full.genuine).sum() == 18
    g = capped.genuine
    assert all(capped.identities[i] == capped.identities[j] for i, j in zip(capped.left[g], capped.right[g]))
    again = all_vs_all(tmp_path, max_genuine_per_identity=4, seed=2)
    assert (again.left == capped.left).all() and (again.right == capped.right).all()


# ---------------------------------------------------------------- LightQNet baseline

def _fixture_crops(n: int = 8) -> np.ndarray:
    from crfiqa.service.imaging import decode_image
    from crfiqa.training.data.recordio import RecordIO

    rec = RecordIO(FIXTURES / "train.rec")
    return np.stack([decode_image(rec.read(k).image).rgb for k in rec.image_keys()[:n]])


def test_lightqnet_follows_its_published_input_spec() -> None:
    import cv2
    import onnxruntime as ort

    from crfiqa.evaluation.lightqnet import find_model, lightqnet_quality

    path = find_model("dm100", [SHARED_MODELS])
    crops = _fixture_crops()
    got = lightqnet_quality(path, crops)
    # SOURCES.md's recipe, written out: the aligned 112 face resized whole to 96, RGB, (x - 128) / 128, NHWC.
    x = np.stack([cv2.resize(c, (96, 96), interpolation=cv2.INTER_LINEAR) for c in crops]).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(["confidence_st:0"], {"input:0": (x - 128.0) / 128.0})[0][:, 0]
    assert got == pytest.approx(want, abs=1e-6) and ((got > 0) & (got < 1)).all()
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), 3) for c in crops])
    low = lightqnet_quality(path, blurred)
    assert (low < got).sum() >= 7 and low.mean() < got.mean() - 0.05  # SOURCES.md: blur lowers the score


def test_lightqnet_file_is_verified(tmp_path: Path) -> None:
    from crfiqa.evaluation.lightqnet import find_model

    (tmp_path / "fiqa").mkdir()
    (tmp_path / "fiqa" / "lightqnet-dm100.onnx").write_bytes(b"not the model")
    with pytest.raises(ValueError, match="sha256"):
        find_model("dm100", [tmp_path])
    with pytest.raises(FileNotFoundError, match="lightqnet-dm050"):
        find_model("dm050", [tmp_path / "nowhere"])


# ---------------------------------------------------------------- quality from CSV files

def _faces(n: int):
    from crfiqa.evaluation.sources import Faces

    return Faces(np.zeros((n, 1, 1, 3), np.uint8), np.ones(n, bool), np.zeros(n), np.zeros(n), [None] * n,
                 [(100, 100)] * n, [str(i) for i in range(n)])


def _protocol(names: list[str]):
    from crfiqa.evaluation.protocols import Protocol

    z = np.zeros(0, int)
    return Protocol(names, [""] * len(names), z, z, np.zeros(0, bool), [Path(n) for n in names])


def test_csv_quality_matches_paths_by_their_ending(tmp_path: Path) -> None:
    from crfiqa.evaluation.sources import FAILURE_QUALITY, csv_quality

    (tmp_path / "q.csv").write_text("path,quality\n/data/x/a/1.jpg,0.5\nother/b/1.jpg,0.7\nb/1.jpg,0.9\n"
                                    "/data/xa/2.jpg,0.3\n")
    q = csv_quality(tmp_path / "q.csv", _protocol(["a/1.jpg", "b/1.jpg", "a/2.jpg", "1.jpg"]), _faces(4), "center")
    # a/1.jpg: by ending; b/1.jpg: the exact path wins; a/2.jpg: "xa/2.jpg" is no "/"-bounded ending of it;
    # 1.jpg: the first CSV path ending in /1.jpg.
    assert list(q) == [0.5, 0.9, FAILURE_QUALITY, 0.5]


def test_csv_quality_scales_to_large_files(tmp_path: Path) -> None:
    import time

    from crfiqa.evaluation.sources import csv_quality

    n = 20000
    names = [f"id{i // 4}/img_{i}.jpg" for i in range(n)]
    (tmp_path / "q.csv").write_text("path,quality\n" + "".join(f"/root/set/{p},{i}\n" for i, p in enumerate(names)))
    start = time.perf_counter()
    q = csv_quality(tmp_path / "q.csv", _protocol(names), _faces(n), "center")
    assert list(q) == list(range(n))
    # Matching by scanning every CSV path per image (20,000 x 20,000 comparisons) took minutes.
    assert time.perf_counter() - start < 20


def test_accuracy_never_splits_tied_scores_and_shares_floor_exactly() -> None:
    """No threshold separates equal scores: four tied scores, half genuine, are at best 50 % accurate; and
    a share in decimals of a count rejects what it says (0.35 x 180 = 63, not the float's 62.99...)."""
    from crfiqa.evaluation.metrics import floor_share, verification_accuracy

    acc, t = verification_accuracy(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 0, 1, 1], bool))
    assert acc == 0.5
    acc, t = verification_accuracy(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool))
    assert acc == 1.0 and 0.2 <= t < 0.8
    assert floor_share(0.35, 180) == 63 and floor_share(0.05, 19) == 0 and floor_share(1e-3, 1000) == 1

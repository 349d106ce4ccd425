"""``crfiqa curate`` on a real local Ray (one ``ray.init`` for the module): the same scores as ``crfiqa score``,
typed failures counted, filters, resume, RecordIO through the CLI joining the cluster, and the report rendered
by headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from crfiqa.curation import filters
from crfiqa.curation.curate import CurateConfig, curate
from crfiqa.curation.sources import open_source
from crfiqa.service.components import COMPONENT_NAMES
from crfiqa.service.detect import DetectorSettings
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.imaging import list_images
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings
from crfiqa.service.settings import Settings
from tests.helpers import LFW, REPO, SHARED, SHARED_MODELS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
CPU = ("CPUExecutionProvider",)
FIXTURE_REC = SHARED / "data" / "fixtures" / "train.rec"
SHARD = 3
MIN_SCORE = 40.0


def _env() -> dict[str, str]:
    return {**os.environ, "CRFIQA_MODELS_DIR": str(SHARED_MODELS), "CRFIQA_PROVIDERS": "CPUExecutionProvider"}


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray for the whole module."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
                   configure_logging=False, log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two identity folders of LFW images, plus a truncated JPEG, a text file named .jpg and a faceless image."""
    root = tmp_path_factory.mktemp("curate_src") / "faces"
    people = [d for d in sorted((LFW / "images").iterdir()) if len(list(d.glob("*.jpg"))) >= 4][:2]
    for person in people:
        (root / person.name).mkdir(parents=True)
        for img in sorted(person.glob("*.jpg"))[:4]:
            shutil.copy(img, root / person.name / img.name)
    first = sorted((root / people[0].name).glob("*.jpg"))[0]
    (root / people[0].name / "zz_truncated.jpg").write_bytes(first.read_bytes()[:2000])
    (root / people[1].name / "zz_notes.jpg").write_text("not an image\n")
    cv2.imwrite(str(root / people[1].name / "zz_blank.png"), np.full((160, 160, 3), 127, np.uint8))
    return root


def _settings(**kw) -> PipelineSettings:
    """The settings ``crfiqa score`` builds from the environment of ``_env`` (detector input 640, ...)."""
    base = Settings(models_dir=SHARED_MODELS, providers=",".join(CPU)).pipeline_settings()
    return replace(base, **kw)


@pytest.fixture(scope="module")
def curated(ray_cluster, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """One curate run of the folder tree (shards of 3 images, a minimum-score filter, the report)."""
    dst = tmp_path_factory.mktemp("curate_out") / "dst"
    cfg = CurateConfig(dataset, dst, _settings(batch_size=8), min_score=MIN_SCORE, batch_size=8, shard_size=SHARD,
                       thumbnails=4)
    return cfg, curate(cfg)


def test_scores_match_crfiqa_score(curated, dataset: Path, tmp_path: Path) -> None:
    """Every face row equals ``crfiqa score`` on the same images: raw quality from the command (printed to 6
    decimals) and raw + 0-100 score from the pipeline loop the command runs (full precision), within 1e-5."""
    cfg, _ = curated
    table = pq.read_table(cfg.dst / "scores.parquet").to_pylist()
    out = tmp_path / "score.jsonl"
    subprocess.run([sys.executable, "-m", "crfiqa.cli", "score", str(dataset), "--out", str(out), "--quiet"],
                   check=True, env=_env(), cwd=REPO, timeout=300)
    cli = [json.loads(line) for line in out.read_text().splitlines()]
    rows = {(r["path"], r["face"]): r for r in table}
    assert len(cli) == len({r["path"] for r in table}) == len(list_images([dataset]))
    n_faces = 0
    for image in cli:
        if not image["faces"]:
            assert rows[(image["path"], None)]["status"] == image["status"]
        for k, face in enumerate(image["faces"]):
            row = rows[(image["path"], k)]
            assert abs(row["quality_raw"] - face["quality"]["raw"]) <= 1e-5
            assert abs(row["det_score"] - face["det_score"]) <= 1e-5
            assert np.allclose([row[c] for c in ("x1", "y1", "x2", "y2")], face["bbox"], atol=0.006)
            n_faces += 1
    assert n_faces == sum(r["face"] is not None for r in table) > 0
    pipe = Pipeline(_settings())
    for result, _ in pipe.run(list_images([dataset])):
        for k, face in enumerate(result.faces):
            row = rows[(result.source, k)]
            assert abs(row["quality_raw"] - face.quality.raw) <= 1e-5
            assert abs(row["quality_score"] - face.quality.score) <= 1e-5


def test_typed_failures_counted_nothing_lost(curated, dataset: Path) -> None:
    """The truncated and the non-image file are typed errors, the blank image a faceless ok row; each image of
    the source has its rows, and the summary counts them."""
    cfg, summary = curated
    table = pq.read_table(cfg.dst / "scores.parquet")
    by_path: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        by_path.setdefault(r["path"], []).append(r)
    assert set(by_path) == {str(p) for p in list_images([dataset])}
    truncated, = (v for k, v in by_path.items() if k.endswith("zz_truncated.jpg"))
    notes, = (v for k, v in by_path.items() if k.endswith("zz_notes.jpg"))
    blank, = (v for k, v in by_path.items() if k.endswith("zz_blank.png"))
    assert [(r["status"], r["error_code"]) for r in truncated] == [("error", "corrupt_image")]
    assert [(r["status"], r["error_code"]) for r in notes] == [("error", "unsupported_format")]
    assert [(r["status"], r["error_code"], r["face"]) for r in blank] == [("ok", "", None)]
    for r in truncated + notes + blank:
        assert all(r[c] is None for c in ("face", "det_score", "x1", "quality_raw", "quality_score"))
    assert summary.errors == {"corrupt_image": 1, "unsupported_format": 1}
    assert summary.no_face == 1
    assert summary.images == len(by_path)
    assert {r["identity"] for r in table.to_pylist()} == {p.name for p in dataset.iterdir()}
    assert json.loads((cfg.dst / "summary.json").read_text())["errors"] == summary.errors


def test_min_score_filter_and_identity_summary(curated) -> None:
    """kept.txt holds exactly the images whose first face scores >= S; identities.csv counts per identity."""
    cfg, summary = curated
    rows = pq.read_table(cfg.dst / "scores.parquet").to_pylist()
    first = [r for r in rows if r["face"] in (None, 0)]
    expected = [r["path"] for r in first if r["quality_score"] is not None and r["quality_score"] >= MIN_SCORE]
    assert (cfg.dst / "kept.txt").read_text().splitlines() == expected
    assert summary.kept == len(expected)
    lines = (cfg.dst / "identities.csv").read_text().splitlines()
    assert lines[0] == "identity,images,kept,dropped,kept_fraction"
    counts = {line.split(",")[0]: tuple(map(int, line.split(",")[1:4])) for line in lines[1:]}
    for ident, (n, kept, dropped) in counts.items():
        mine = [r for r in first if r["identity"] == ident]
        assert n == len(mine) and n == kept + dropped
        assert kept == sum(r["path"] in expected for r in mine)


def test_drop_fraction_drops_exactly_the_lowest() -> None:
    """floor(F x scored) of the lowest-scoring scored images go; faceless and failed ones are never kept."""
    scores = [50.0, 10.0, None, 70.0, 30.0, 90.0, None]
    status = ["ok", "ok", "ok", "ok", "ok", "ok", "error"]
    table = pa.table({"path": [f"p{i}" for i in range(7)], "status": status,
                      "error_code": ["" if s == "ok" else "corrupt_image" for s in status],
                      "face": pa.array([None if s is None else 0 for s in scores], pa.int32()),
                      "quality_score": pa.array(scores, pa.float64()), "identity": list("aabbbcc")})
    result = filters.apply_filter(table, drop_fraction=0.5)  # 5 scored -> drop 2 (10, 30)
    assert [p for p, k in zip(result.paths, result.kept) if k] == ["p0", "p3", "p5"]
    assert result.dropped == {"low_score": 2, "no_face": 1, "error": 1}
    assert result.threshold == 50.0
    assert result.per_identity()[0][0] == "b"  # the identity losing the largest share comes first
    assert dict((i, (n, k)) for i, n, k in result.per_identity()) == {"a": (2, 1), "b": (3, 1), "c": (2, 1)}


def test_resume_skips_complete_shards(curated) -> None:
    """A rerun into the same DST rewrites only the missing shard; the others keep their files (mtimes); the
    merged scores are identical. Other settings into the same DST are refused (out_mismatch)."""
    cfg, first = curated
    shards = sorted((cfg.dst / "shards").glob("part-*.parquet"))
    assert len(shards) == first.shards == math.ceil(first.images / SHARD) >= 3
    before = pq.read_table(cfg.dst / "scores.parquet")
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    again = curate(cfg)
    assert again.shards_written == [1]
    assert again.shards_skipped == len(shards) - 1
    for p in shards:
        if p != shards[1]:
            assert p.stat().st_mtime_ns == mtimes[p.name]
    assert shards[1].is_file()
    assert pq.read_table(cfg.dst / "scores.parquet").equals(before)
    other = CurateConfig(cfg.src, cfg.dst, _settings(detection=DetectorSettings(input_size=640, score_threshold=0.7)),
                         shard_size=SHARD)
    with pytest.raises(CrfiqaError) as err:
        curate(other)
    assert err.value.code == "out_mismatch"
    assert not list((cfg.dst / "shards").glob(".*.tmp"))  # no half-written shard left behind


def test_gpu_layout_run_on_cpus_gives_the_fused_rows(ray_cluster, curated, dataset: Path) -> None:
    """Without GPUs curate runs fused (each task prepares and scores its batch); the GPU layout (prepare tasks,
    then a scoring actor pool fed crops through the object store), run here on CPUs, gives the same rows."""
    from crfiqa.curation import job
    from crfiqa.curation.curate import resources

    cfg, _ = curated
    assert resources(cfg) == job.Resources(actors=0, scorer_cpus=1.0, fused=True)
    source = open_source(dataset)
    rows = {}
    for layout in (job.Resources(actors=1, scorer_cpus=1.0, prepare_cpus=1.0), resources(cfg)):
        batches = job.run(source, list(range(len(source))), SHARD, cfg.settings, cfg.options, layout, 4)
        table = pa.concat_tables(list(batches)).sort_by("index")
        rows[layout.fused] = table.select(["index", "status", "error_code", "faces", "det_score", "boxes",
                                           "quality_raw", "quality_score"]).to_pylist()
    assert len(rows[True]) == len(source) and sum(r["faces"] for r in rows[True]) > 0
    for split, fused in zip(rows[False], rows[True], strict=True):
        for key in ("quality_raw", "quality_score"):  # batches differ: the model's values within 1e-5
            assert np.allclose(np.frombuffer(split.pop(key), "<f8"), np.frombuffer(fused.pop(key), "<f8"), atol=1e-5)
        assert split == fused  # the same detections, statuses and error codes, image by image


def test_cli_recordio_on_the_running_cluster(ray_cluster, tmp_path: Path) -> None:
    """``crfiqa curate train.rec --aligned --ray-address ...`` joins the module's cluster: one row per record
    with its class as identity, scores equal to the pipeline's on the record bytes, a drop-fraction filter."""
    from crfiqa.training.data.recordio import RecordIO

    dst = tmp_path / "rec_out"
    proc = subprocess.run(
        [sys.executable, "-m", "crfiqa.cli", "curate", str(FIXTURE_REC), "--out", str(dst), "--aligned",
         "--ray-address", ray_cluster, "--drop-fraction", "0.25", "--batch-size", "16", "--shard-size", "12",
         "--components"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = json.loads((FIXTURE_REC.parent / "train_expected.json").read_text())
    assert summary["images"] == summary["scored"] == expected["num_images"]
    assert summary["kept"] == expected["num_images"] - math.floor(0.25 * expected["num_images"])
    rows = pq.read_table(dst / "scores.parquet").to_pylist()
    rec = RecordIO(FIXTURE_REC)
    keys = [int(r["path"].rsplit("#", 1)[1]) for r in rows]
    assert keys == [img["index"] for img in expected["images"]]
    assert [r["identity"] for r in rows] == [str(img["label"]) for img in expected["images"]]
    pipe = Pipeline(_settings())
    opts = Options(aligned=True, components=True)
    results = pipe.score_prepared([pipe.prepare((r["path"], rec.read(k).image), opts) for r, k in zip(rows, keys)])
    for r, res in zip(rows, results):
        face = res.faces[0]
        assert abs(r["quality_raw"] - face.quality.raw) <= 1e-5
        assert abs(r["quality_score"] - face.quality.score) <= 1e-5
        for name, comp in face.components.items():  # --components: native value and 0-100 score columns
            assert abs(r[name] - comp.value) <= 1e-5 * max(1.0, abs(comp.value))
            assert (r[f"{name}_score"] is None) == (comp.score is None)
            if comp.score is not None:
                assert abs(r[f"{name}_score"] - comp.score) <= 1e-5
    assert set(COMPONENT_NAMES) <= set(rows[0]) and len(COMPONENT_NAMES) >= 5
    assert len((dst / "kept.txt").read_text().splitlines()) == summary["kept"]
    assert (dst / "identities.csv").read_text().count("\n") == expected["num_classes"] + 1


def test_recordio_reader_needs_no_torch(tmp_path: Path) -> None:
    """The curate sources open a RecordIO with torch unimportable (a cluster image without the train extra)."""
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\nfrom crfiqa.curation.sources import open_source, Loader\n"
            f"s = open_source({str(FIXTURE_REC)!r})\nsrc, ident = Loader(s.rec).load(s.names[0], s.keys[0])\n"
            "print(len(s), ident, len(src[1]), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    n, ident, size, torch_loaded = out.stdout.split()
    assert (int(n), torch_loaded) == (32, "False") and int(size) > 1000 and ident == "0"


def test_list_sources(tmp_path: Path, dataset: Path) -> None:
    """A .txt list (relative to its folder, optional identity column) and a .parquet list name the same images."""
    images = list_images([dataset])
    txt = dataset.parent / "list.txt"
    txt.write_text("# faces\n" + "".join(f"{p.relative_to(dataset.parent)}\t{p.parent.name}\n" for p in images))
    src = open_source(txt)
    assert src.names == [str(p) for p in images] and src.identities == [p.parent.name for p in images]
    pq.write_table(pa.table({"path": [str(p) for p in images]}), tmp_path / "list.parquet")
    src = open_source(tmp_path / "list.parquet")
    assert src.names == [str(p) for p in images] and src.identities is None and not src.has_identity
    with pytest.raises(CrfiqaError) as err:
        open_source(tmp_path / "nothing.csv")
    assert err.value.code == "unsupported_source"


class _Dom(HTMLParser):
    """Section ids, image sources, decile blocks and anything that would fetch from the network."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.deciles = 0
        self.fetches: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "div" and a.get("class") == "decile":
            self.deciles += 1
        if tag in ("script", "link", "iframe") or (a.get("href") or "").startswith("http"):
            self.fetches.append(tag)


def test_report_renders_in_headless_chromium(curated, tmp_path: Path) -> None:
    """Chromium renders report.html to a non-blank screenshot; its DOM has every section, a histogram and
    decile thumbnails, all inline (data: URIs, nothing fetched)."""
    cfg, _ = curated
    url = (cfg.dst / "report.html").resolve().as_uri()
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'u'}"]
    shot = tmp_path / "x.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", url], check=True,
                   capture_output=True, timeout=180)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2000, 1200)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # drawn, not blank
    dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180).stdout
    parsed = _Dom()
    parsed.feed(dom)
    assert parsed.sections[:5] == ["summary", "histogram", "deciles", "status", "filter"]
    assert parsed.deciles == 10
    assert parsed.images and all(src.startswith("data:image/") for src in parsed.images)
    assert sum(src.startswith("data:image/jpeg") for src in parsed.images) >= 5
    assert sum(src.startswith("data:image/png") for src in parsed.images) == 1
    assert not parsed.fetches
    assert "corrupt_image" in dom and "unsupported_format" in dom and "quality_score &gt;= 40" in dom


def test_kuberay_rayjob_is_a_valid_curate_job(tmp_path: Path) -> None:
    """The KubeRay manifest is a RayJob whose entrypoint is a ``crfiqa curate`` command line the CLI accepts,
    with a head and a GPU worker group running one image."""
    import shlex

    from crfiqa.cli import build_parser

    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "kuberay" / "rayjob.yaml").read_text()))
    job, = (d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["crfiqa", "curate"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "curate" and args.num_gpus >= 1 and args.out
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    images = {head["image"], *(w["template"]["spec"]["containers"][0]["image"] for w in workers)}
    assert len(images) == 1
    gpus = sum(int(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * w["replicas"] for w in workers)
    assert gpus >= args.num_gpus
    assert spec.get("shutdownAfterJobFinishes") is True
    # The pod templates and the volume claim are valid Kubernetes objects (the RayJob CRD itself needs a server).
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{i}"}, "spec": t["template"]["spec"]}
            for i, t in enumerate([cluster["headGroupSpec"], *workers])]
    claims = [d for d in docs if d["kind"] != "RayJob"]
    mounted = {v["persistentVolumeClaim"]["claimName"] for p in pods for v in p["spec"]["volumes"]}
    assert {"crfiqa-data", "crfiqa-models"} == mounted and {c["metadata"]["name"] for c in claims} == {"crfiqa-data"}
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all(pods + claims))
    validate = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    subprocess.run([validate, "-k", "1.31.0", str(manifest)], check=True, capture_output=True, timeout=120)


def test_curate_help_imports_no_ray() -> None:
    """``crfiqa --help`` (and building the curate parser) imports neither Ray nor pyarrow."""
    code = ("import sys; from crfiqa.cli import build_parser; build_parser().parse_args(['curate', 'x', '--out', 'y'])"
            "; print(sorted(m for m in ('ray', 'pyarrow', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_a_file_name_that_is_not_utf8_is_named_before_any_work(tmp_path: Path) -> None:
    """The Parquet outputs hold names as UTF-8 text: such a name is a typed error naming it, up front (it
    crashed the run's fingerprint with a UnicodeEncodeError)."""
    from crfiqa.service.errors import CrfiqaError
    from tests.helpers import SAMPLES

    (tmp_path / "bob").mkdir()
    shutil.copy(SAMPLES / "t1.jpg", tmp_path / "bob" / "1.jpg")
    shutil.copy(SAMPLES / "t1.jpg", tmp_path / "bob" / os.fsdecode(b"caf\xe9.jpg"))
    with pytest.raises(CrfiqaError) as info:
        open_source(tmp_path)
    assert info.value.code == "bad_name" and "caf" in info.value.message and "1 file names" in info.value.message


def test_broken_model_fails_before_ray_starts(tmp_path: Path) -> None:
    """``crfiqa curate --model broken.onnx``: the typed ``bad_model`` from the driver before any Ray task (each
    task failing on it raised Ray's UserCodeException with ONNX Runtime's traceback), and no shard written."""
    from tests.helpers import SAMPLES

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model\n")
    (tmp_path / "list.txt").write_text(f"{SAMPLES / 't1.jpg'}\n")
    r = subprocess.run([sys.executable, "-m", "crfiqa.cli", "curate", str(tmp_path / "list.txt"), "--out",
                        str(tmp_path / "dst"), "--model", str(broken), "--no-report"],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 1 and "bad_model" in r.stderr and str(broken) in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "UserCodeException" not in r.stderr and "ray.init" not in r.stderr
    assert not (tmp_path / "dst" / "manifest.json").exists()  # DST not claimed: the right model can go there

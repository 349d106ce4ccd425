"""The pieces of the Docker end-to-end check (deploy/e2e.sh runs the real thing in CI: .ci/run).

These run without an engine: the checks' own logic on real inputs (apt source files in both formats,
the service's real /metrics text, real `crfiqa score` output), the scripts' syntax, and the compose file
resolving the image overrides that deploy/e2e.sh uses.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, SAMPLES, SHARED_MODELS

_spec = importlib.util.spec_from_file_location("e2e_checks", REPO / "deploy" / "e2e_checks.py")
assert _spec and _spec.loader
e2e_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e_checks)


def test_apt_mirror_deb822_and_one_line(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert e2e_checks.apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://one.example/debian bookworm main contrib\n")
    assert e2e_checks.apt_mirror(tmp_path) == "http://one.example/debian"  # sources.list is read first
    (tmp_path / "sources.list").write_text("deb http://one.example/debian trixie main\n")
    assert e2e_checks.apt_mirror(tmp_path) == "http://mirror.example/debian"
    assert e2e_checks.apt_mirror(tmp_path / "missing") == "http://deb.debian.org/debian"


def test_metric_reads_prometheus_text() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    reg = CollectorRegistry()
    Gauge("crfiqa_ready", "r", registry=reg).set(1)
    c = Counter("crfiqa_requests", "n", ["endpoint", "status"], registry=reg)
    c.labels("/v1/quality", "200").inc(3)
    c.labels("/v1/quality", "400").inc()
    c.labels("/metrics", "200").inc(5)
    h = Histogram("crfiqa_quality_score", "s", buckets=[30, 60], registry=reg)
    for v in (10, 50, 90):
        h.observe(v)
    text = generate_latest(reg).decode()
    assert e2e_checks.metric(text, "crfiqa_ready") == 1
    assert e2e_checks.metric(text, "crfiqa_requests_total", endpoint="/v1/quality", status="200") == 3
    assert e2e_checks.metric(text, "crfiqa_requests_total", endpoint="/v1/quality") == 4
    assert e2e_checks.metric(text, "crfiqa_quality_score_count") == 3  # not the _bucket or _sum series
    with pytest.raises(e2e_checks.Failed):
        e2e_checks.metric(text, "crfiqa_requests_total", status="500")


@pytest.fixture(scope="module")
def host_faces() -> list[dict]:
    return e2e_checks.host_scores(SHARED_MODELS)


def test_compare_accepts_equal_and_rejects_drift(host_faces: list[dict]) -> None:
    assert len(host_faces) == 6 and all("raw" in f["quality"] for f in host_faces)
    served = list(reversed(copy.deepcopy(host_faces)))  # the order of the response does not matter
    assert e2e_checks.compare(host_faces, e2e_checks.faces_of({"faces": served})) == (0.0, 0.0)
    drifted = copy.deepcopy(host_faces)
    drifted[2]["quality"]["raw"] += 2e-4
    with pytest.raises(e2e_checks.Failed, match="scores differ"):
        e2e_checks.compare(host_faces, drifted)
    moved = copy.deepcopy(host_faces)
    moved[0]["bbox"][0] += 5
    with pytest.raises(e2e_checks.Failed, match="boxes differ"):
        e2e_checks.compare(host_faces, moved)
    with pytest.raises(e2e_checks.Failed, match="expected 6 faces"):
        e2e_checks.compare(host_faces, host_faces[:5])


def test_sample_is_the_documented_one() -> None:
    assert e2e_checks.SAMPLE == SAMPLES / "t1.jpg" and e2e_checks.SAMPLE.is_file()


@pytest.mark.parametrize("script", ["deploy/e2e.sh", "deploy/wheelhouse.sh", ".ci/run"])
def test_scripts_parse_and_are_executable(script: str) -> None:
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_ci_runs_the_e2e_after_the_suite() -> None:
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    e2e_line = next(i for i, line in enumerate(lines) if line.startswith("deploy/e2e.sh"))
    assert e2e_line > pytest_line and lines[-1] == 'exit "$status"'


def test_e2e_cache_and_engine_state_stay_outside_the_repo() -> None:
    text = (REPO / "deploy" / "e2e.sh").read_text()
    assert '--data-root "$data"' in text and '--exec-root "$exec_root"' in text and '--pidfile "$pidfile"' in text
    assert "the cache must be outside the repository" in text
    r = subprocess.run([str(REPO / "deploy" / "e2e.sh")], env={**os.environ, "CRFIQA_DOCKER_CACHE": str(REPO / "x")},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "outside the repository" in r.stderr and not (REPO / "x").exists()


def test_compose_resolves_the_image_overrides() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is not installed (.ci/run installs it)"
    env = {**os.environ, "CRFIQA_IMAGE": "local/crfiqa:x", "PROMETHEUS_IMAGE": "local/prom:y",
           "CRFIQA_BASE_IMAGE": "local/python:z", "CRFIQA_PORT": "18123"}
    out = subprocess.run([compose, "-f", "docker-compose.yml", "--env-file", ".env.example", "config"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True, timeout=60).stdout
    spec = yaml.safe_load(out)["services"]
    assert spec["crfiqa"]["image"] == spec["models"]["image"] == "local/crfiqa:x"
    assert spec["prometheus"]["image"] == "local/prom:y"
    assert spec["crfiqa"]["build"]["args"]["BASE_IMAGE"] == "local/python:z"
    assert re.search(r"18123", str(spec["crfiqa"]["ports"]))
    assert "--storage.tsdb.path=/prometheus" in spec["prometheus"]["command"]  # official and Debian image alike

"""Deployment files checked with the real validators, and the service run exactly as the image runs it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import REPO, SAMPLES, SHARED_MODELS
from tests.server import Server, free_port

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a validator; a missing one is a failure, never a skip (.ci/run and setup.sh install them)."""
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed (.ci/run installs it)")
    return path


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.gpu", "docker/prometheus/Dockerfile.debian",
                                        "deploy/offline/python.Dockerfile"])
def test_hadolint_clean(dockerfile: str) -> None:
    run(tool("hadolint"), str(REPO / dockerfile))


def test_dockerfiles_contract() -> None:
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        assert text.count("FROM ") >= 2 and "COPY --from=build /opt/venv" in text
        assert 'CMD ["crfiqa", "serve"]' in text and "HEALTHCHECK" in text and "/healthz" in text
        assert re.search(r"^USER 10001$", text, re.M) and "EXPOSE 8000" in text and "STOPSIGNAL SIGTERM" in text
        # Portable: the base and the wheelhouse are build arguments; an install from wheels never reaches
        # an index; nothing of the machines deploy/e2e.sh runs on is named.
        assert re.search(r"^ARG BASE_IMAGE=\S+$", text, re.M) and re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
        assert re.search(r"^ARG WHEELHOUSE=docker/wheelhouse$", text, re.M) and "--no-index --find-links" in text
        assert not re.search(r"crfiqa-e2e|/var/cache|/work/|deb\.debian\.org|/opt/wheels", text)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", (DOCKER / "Dockerfile").read_text(), re.M)
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:12\.\S+-cudnn-runtime-\S+$", gpu, re.M)
    assert "[gpu]" in gpu and "[cpu]" not in gpu and "CUDAExecutionProvider,CPUExecutionProvider" in gpu


def test_dockerignore_keeps_the_wheelhouse_and_drops_fetched_models() -> None:
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules.index("!docker/wheelhouse") > rules.index("docker")  # later lines win
    assert {"models/det", "models/fr", ".venv", ".git", "tests"} <= set(rules)
    assert rules.index("!models/crfiqa_mbf.onnx") > rules.index("models/*.onnx")
    ignored = (REPO / "docker" / "wheelhouse" / ".gitignore").read_text().split()
    assert ignored[0] == "*" and "!README.md" in ignored  # wheels are never committed


def test_promtool_config_rules_and_unit_tests(tmp_path: Path) -> None:
    promtool = tool("promtool")
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = (DOCKER / "prometheus" / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(config)
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"), cwd=tmp_path)
    run(promtool, "check", "rules", str(DOCKER / "prometheus" / "alerts.yml"))
    out = run(promtool, "test", "rules", "alerts_test.yml", cwd=DOCKER / "prometheus")
    assert "SUCCESS" in out.stdout + out.stderr
    alerts = {r["alert"] for g in yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tested = set(re.findall(r"alertname: (\w+)", (DOCKER / "prometheus" / "alerts_test.yml").read_text()))
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_compose_config() -> None:
    compose = tool("docker-compose")
    for profile in ([], ["--profile", "gpu"]):
        run(compose, "-f", "docker-compose.yml", "--env-file", ".env.example", *profile, "config", "-q")
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert {"crfiqa", "crfiqa-gpu", "models", "prometheus", "grafana"} <= set(spec["services"])


def test_every_service_setting_is_in_the_readme_table() -> None:
    from crfiqa.service.settings import Settings

    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `CRFIQA_")]
    documented = set(re.findall(r"`CRFIQA_([A-Z0-9_]+)`", "\n".join(rows)))
    assert {name.upper() for name in Settings.model_fields} <= documented


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_kubernetes_manifests(target: str, tmp_path: Path) -> None:
    rendered = run(tool("kubectl"), "kustomize", str(REPO / "deploy" / "k8s" / target)).stdout
    (tmp_path / "all.yaml").write_text(rendered)
    out = run(tool("kubernetes-validate"), "-k", "1.31.0", str(tmp_path / "all.yaml"))
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "ServiceMonitor"} <= kinds
    assert out.stdout.count("passed") >= len(docs) - 1  # all but the custom resource
    # The ServiceMonitor has no schema in the validator: check its structure against the Service.
    svc = next(d for d in docs if d["kind"] == "Service")
    mon = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(mon["spec"]["selector"]["matchLabels"].items()) <= set(svc["metadata"]["labels"].items())
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in c["lifecycle"] and dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    if target == "overlays/gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["image"] == "crfiqa:gpu"


def _image_env_and_cmd() -> tuple[dict[str, str], list[str]]:
    """ENV and CMD of the CPU image's final stage."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM "):]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
        if line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return env, cmd


@pytest.fixture(scope="module")
def image_like_server(tmp_path_factory: pytest.TempPathFactory):
    """`crfiqa serve` with the image's CMD and ENV, models from a directory laid out like the volume."""
    volume = tmp_path_factory.mktemp("models")
    subprocess.run([str(BIN / "crfiqa"), "models", "fetch", "--quiet", "--from", str(SHARED_MODELS)],
                   env={**os.environ, "CRFIQA_MODELS_DIR": str(volume)}, check=True, timeout=300)
    env, cmd = _image_env_and_cmd()
    env = {k: v.replace("$PATH", os.environ["PATH"]) for k, v in env.items()}
    env.update(CRFIQA_MODELS_DIR=str(volume), CRFIQA_PORT=str(free_port()), PATH=f"{BIN}:{os.environ['PATH']}")
    assert cmd == ["crfiqa", "serve"] and env["CRFIQA_HOST"] == "0.0.0.0"
    srv = Server(env=env, command=cmd, log=volume / "server.log")
    srv.port = int(env["CRFIQA_PORT"])
    srv.url = f"http://127.0.0.1:{srv.port}"
    srv.wait_ready()
    yield srv
    srv.stop()


def test_image_command_serves(image_like_server: Server) -> None:
    assert httpx.get(image_like_server.url + "/readyz").status_code == 200
    r = httpx.post(image_like_server.url + "/v1/quality", files=[("images", ("t1.jpg", (SAMPLES / "t1.jpg").read_bytes()))])
    assert r.status_code == 200 and len(r.json()["results"][0]["faces"]) == 6
    assert "crfiqa_ready 1.0" in httpx.get(image_like_server.url + "/metrics").text


def test_dashboard_and_alert_metrics_are_exported(image_like_server: Server) -> None:
    url = image_like_server.url
    httpx.post(url + "/v1/quality", files=[("images", ("bad.jpg", b"not an image"))])  # an error code series
    exported = {line.split("{")[0].split(" ")[0] for line in httpx.get(url + "/metrics").text.splitlines()
                if line and not line.startswith("#")}
    used = set(re.findall(r"\b(crfiqa_[a-z_]+)", (DOCKER / "grafana" / "dashboards" / "crfiqa.json").read_text()))
    used |= set(re.findall(r"\b(crfiqa_[a-z_]+)\b(?!:)", (DOCKER / "prometheus" / "alerts.yml").read_text()))
    used = {u for u in used if not u.startswith("crfiqa_config")}
    assert used and used <= exported, f"used but not exported: {sorted(used - exported)}"


def test_startup_refuses_mismatching_model(tmp_path: Path) -> None:
    target = tmp_path / "det" / "scrfd_500m.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the model")
    srv = Server(env={"CRFIQA_MODELS_DIR": str(tmp_path)}, log=tmp_path / "log")
    assert srv.proc.wait(60) != 0 and "startup failed: checksum_mismatch" in (tmp_path / "log").read_text()


def test_grafana_provisioning_matches_compose() -> None:
    """Grafana is not packaged by Debian and no registry is reachable here, so it never runs in deploy/e2e.sh:
    its provisioning is checked against the compose file and the dashboard instead."""
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in spec["grafana"]["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    ds = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and len(ds["datasources"]) == 1
    source = ds["datasources"][0]
    prom_port = re.search(r":(\d+)\"?\]?$", str(spec["prometheus"]["ports"][0])).group(1)
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prom_port}"
    providers = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "crfiqa.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert providers["apiVersion"] == 1 and mounts[path] == "./docker/grafana/dashboards"
    board = json.loads((DOCKER / "grafana" / "dashboards" / "crfiqa.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["schemaVersion"] >= 30
    for panel in board["panels"]:
        assert {"type", "title", "gridPos", "targets"} <= set(panel), panel.get("title")
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"] and target["expr"].strip()

"""The checks of deploy/e2e.sh against a real Docker engine: one container, then the compose stack.

    python deploy/e2e_checks.py apt-mirror
    python deploy/e2e_checks.py container --image crfiqa:cpu --models DIR
    python deploy/e2e_checks.py compose --image crfiqa:cpu --prometheus-image IMG --models DIR

``DOCKER`` (docker CLI) and ``COMPOSE`` (``docker compose`` or ``docker-compose``) come from the environment.
Every check raises ``Failed`` with the evidence; the containers started here are removed on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("CRFIQA_SHARED", REPO.parent / "shared")) / "data" / "samples" / "t1.jpg"
DOCKER = os.environ.get("DOCKER", "docker")
COMPOSE = shlex.split(os.environ.get("COMPOSE", "docker-compose"))
LABEL = "crfiqa-e2e"  # deploy/e2e.sh removes whatever carries it, should this script die
UID = 10001
SCORE_TOL = 1e-4  # host vs container, on the model's raw output
GRACE_S = 30.0  # CRFIQA_GRACEFUL_TIMEOUT_S of the image (settings default)
MAX_IMAGE_MB = float(os.environ.get("CRFIQA_E2E_MAX_IMAGE_MB", "600"))


class Failed(Exception):
    """A check did not hold."""


def say(msg: str) -> None:
    """One line of the e2e log."""
    print(f"  [checks] {msg}", flush=True)


def sh(*cmd: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; a failure carries its output."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise Failed(f"{shlex.join(cmd)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout.strip()


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """Poll ``probe`` until it returns something truthy; raise with the last error after ``timeout``."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (httpx.HTTPError, Failed, KeyError, IndexError, ValueError) as exc:
            last = exc
        time.sleep(every)
    raise Failed(f"{what}: not after {timeout:.0f} s (last: {last!r})")


def free_port() -> int:
    """A TCP port free on the host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (exact name) whose labels include ``labels``, in Prometheus text."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total, found = total + float(m.group(3)), True
    if not found:
        raise Failed(f"no sample of {name}{labels or ''} in /metrics")
    return total


def post_images(url: str, n: int = 1, timeout: float = 120) -> httpx.Response:
    """POST /v1/quality with ``n`` copies of t1.jpg."""
    data = SAMPLE.read_bytes()
    files = [("images", (f"t1_{k}.jpg", data, "image/jpeg")) for k in range(n)]
    return httpx.post(url + "/v1/quality", files=files, timeout=timeout)


def faces_of(result: dict) -> list[dict]:
    """The faces of one image result, ordered by box (the comparison key)."""
    if result.get("status", "ok") != "ok" and "error" in result:
        raise Failed(f"image failed: {result}")
    return sorted(result["faces"], key=lambda f: (round(f["bbox"][0]), round(f["bbox"][1])))


def host_scores(models: Path) -> list[dict]:
    """`crfiqa score` on the host (the venv of this interpreter), same models, same image."""
    crfiqa = Path(sys.executable).parent / "crfiqa"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t1.jsonl"
        sh(str(crfiqa), "score", "--quiet", "--models-dir", str(models), "--out", str(out), str(SAMPLE))
        return faces_of(json.loads(out.read_text().splitlines()[0]))


def compare(host: list[dict], served: list[dict]) -> tuple[float, float]:
    """Max |raw| and |score| differences, face by face; boxes must agree to the pixel."""
    if len(host) != 6 or len(served) != 6:
        raise Failed(f"expected 6 faces: host {len(host)}, container {len(served)}")
    d_raw = d_score = 0.0
    for h, s in zip(host, served, strict=True):
        if max(abs(a - b) for a, b in zip(h["bbox"], s["bbox"], strict=True)) > 1.0:
            raise Failed(f"boxes differ: host {h['bbox']} container {s['bbox']}")
        d_raw = max(d_raw, abs(h["quality"]["raw"] - s["quality"]["raw"]))
        d_score = max(d_score, abs(h["quality"]["score"] - s["quality"]["score"]))
    # raw is printed to 1e-6, score (0-100) to 1e-3: one rounding step is the most an equal value differs.
    if d_raw > SCORE_TOL or d_score > SCORE_TOL + 1e-3 + 1e-9:
        raise Failed(f"scores differ: max |raw| {d_raw:.2e}, max |score| {d_score:.2e}")
    return d_raw, d_score


def inspect(container: str, fmt: str) -> str:
    """``docker inspect -f fmt``."""
    return sh(DOCKER, "inspect", "-f", fmt, container)


@contextmanager
def container(image: str, models: Path) -> Iterator[tuple[str, str]]:
    """A detached crfiqa container with the models volume read-only; yields (id, base URL)."""
    cid = sh(DOCKER, "run", "-d", "--label", LABEL, "-p", "127.0.0.1::8000", "-v", f"{models}:/models:ro",
             "--health-interval", "2s", "--health-start-period", "120s", image)
    try:
        port = sh(DOCKER, "port", cid, "8000/tcp").splitlines()[0].rsplit(":", 1)[1]
        yield cid, f"http://127.0.0.1:{port}"
    except BaseException:
        print(sh(DOCKER, "logs", "--tail", "40", cid, check=False), file=sys.stderr)
        raise
    finally:
        sh(DOCKER, "rm", "-f", "-v", cid, check=False)


def check_container(image: str, models: Path) -> None:
    """Readiness, scores vs the host, metrics, uid, health, SIGTERM drain, size."""
    host = host_scores(models)
    t0 = time.monotonic()
    with container(image, models) as (cid, url):
        def ready() -> bool:
            if inspect(cid, "{{.State.Running}}") != "true":
                raise Failed(f"container exited: {inspect(cid, '{{.State.ExitCode}}')}\n"
                             f"{sh(DOCKER, 'logs', '--tail', '40', cid, check=False)}")
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        wait_for("/readyz", ready, 180)
        say(f"/readyz 200 after {time.monotonic() - t0:.1f} s")

        r = post_images(url)
        if r.status_code != 200:
            raise Failed(f"POST /v1/quality -> {r.status_code}: {r.text[:500]}")
        d_raw, d_score = compare(host, faces_of(r.json()["results"][0]))
        say(f"t1.jpg: 6 faces, = host `crfiqa score`: max |raw diff| {d_raw:.1e}, max |score diff| {d_score:.1e}")

        text = httpx.get(url + "/metrics", timeout=5).text
        ready_v = metric(text, "crfiqa_ready")
        n_scores = metric(text, "crfiqa_quality_score_count")
        n_ok = metric(text, "crfiqa_requests_total", endpoint="/v1/quality", status="200")
        if ready_v != 1 or n_scores < 6 or n_ok < 1:
            raise Failed(f"/metrics: crfiqa_ready {ready_v}, quality scores {n_scores}, 200s {n_ok}")
        say(f"/metrics: crfiqa_ready 1, crfiqa_quality_score_count {n_scores:.0f}, /v1/quality 200s {n_ok:.0f}")

        pid = inspect(cid, "{{.State.Pid}}")
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if set(uids) != {str(UID)} or "crfiqa serve" not in cmdline:
            raise Failed(f"PID 1 of the container: uids {uids}, command {cmdline!r}")
        say(f"PID 1 = `{cmdline.strip()}` runs as uid {UID} (real, effective, saved, fs)")

        health = wait_for("HEALTHCHECK healthy",
                          lambda: (s := inspect(cid, "{{.State.Health.Status}}")) == "healthy" and s, 60)
        say(f"HEALTHCHECK: {health}")

        check_sigterm(cid, url)
    size_mb = int(sh(DOCKER, "image", "inspect", "-f", "{{.Size}}", image)) / 1e6
    say(f"image {image}: {size_mb:.0f} MB (goal <= {MAX_IMAGE_MB:.0f} MB)")
    if size_mb > MAX_IMAGE_MB:
        raise Failed(f"image {image} is {size_mb:.0f} MB > {MAX_IMAGE_MB:.0f} MB")


def check_sigterm(cid: str, url: str) -> None:
    """SIGTERM while a request is being processed: the request completes, the process exits 0 in time."""
    t = time.monotonic()
    post_images(url, 2)
    per_image = (time.monotonic() - t) / 2
    n = max(4, min(64, int(3.0 / max(per_image, 1e-3))))  # a request of about 3 s
    box: dict[str, Any] = {}

    def send() -> None:
        box["start"] = time.monotonic()
        try:
            box["response"] = post_images(url, n, timeout=GRACE_S + 30)
        except httpx.HTTPError as exc:
            box["error"] = exc
        box["end"] = time.monotonic()

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(min(1.0, n * per_image / 3))
    sig_at = time.monotonic()
    sh(DOCKER, "kill", "--signal", "TERM", cid)
    thread.join(GRACE_S + 40)
    exit_code = int(sh(DOCKER, "wait", cid, timeout=GRACE_S + 30))
    exited_after = time.monotonic() - sig_at
    if "error" in box:
        raise Failed(f"the in-flight request failed after SIGTERM: {box['error']!r}")
    r: httpx.Response = box["response"]
    if not (box["start"] < sig_at < box["end"]):
        raise Failed("the request was not in flight when SIGTERM arrived; make it longer")
    results = r.json()["results"] if r.status_code == 200 else []
    if r.status_code != 200 or len(results) != n or any(len(x["faces"]) != 6 for x in results):
        raise Failed(f"in-flight request after SIGTERM: {r.status_code}, {len(results)}/{n} images")
    if exit_code != 0 or exited_after > GRACE_S:
        raise Failed(f"after SIGTERM: exit code {exit_code} after {exited_after:.1f} s (grace {GRACE_S:.0f} s)")
    say(f"SIGTERM {sig_at - box['start']:.1f} s into a {n}-image request: it completed (200, {n}x6 faces) "
        f"{box['end'] - sig_at:.1f} s later; exit code 0 {exited_after:.1f} s after the signal")


# --- compose ---------------------------------------------------------------------------------------------

def compose(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run the compose CLI on the repo's docker-compose.yml as project crfiqa-e2e."""
    return sh(*COMPOSE, "-p", "crfiqa-e2e", "-f", str(REPO / "docker-compose.yml"), "--env-file",
              str(REPO / ".env.example"), *args, timeout=timeout, env=env)


def prom(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus HTTP API endpoint, return its ``data``."""
    body = httpx.get(base + path, params=params, timeout=5).json()
    if body.get("status") != "success":
        raise Failed(f"{path}: {body}")
    return body["data"]


def check_compose(image: str, prometheus_image: str, models: Path) -> None:
    """crfiqa + the models one-shot + Prometheus: target up, rules loaded, score samples after traffic."""
    crfiqa_port, prom_port = free_port(), free_port()
    env = {**os.environ, "CRFIQA_IMAGE": image, "PROMETHEUS_IMAGE": prometheus_image,
           "MODEL_MIRROR_DIR": str(models), "CRFIQA_MODEL_MIRROR": "/mirror",
           "CRFIQA_PORT": str(crfiqa_port), "PROMETHEUS_PORT": str(prom_port)}
    url, purl = f"http://127.0.0.1:{crfiqa_port}", f"http://127.0.0.1:{prom_port}"
    t0 = time.monotonic()
    try:
        # Grafana is left out: no image without a registry, and Debian does not package it.
        compose(env, "up", "-d", "--no-build", "crfiqa", "prometheus")
        models_id = sh(DOCKER, "ps", "-aq", "--filter", "label=com.docker.compose.project=crfiqa-e2e",
                       "--filter", "label=com.docker.compose.service=models").splitlines()[0]
        wait_for("crfiqa /readyz (compose)", lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, 240)
        code = inspect(models_id, "{{.State.Status}} {{.State.ExitCode}}")
        if code != "exited 0":
            raise Failed(f"models one-shot: {code}")
        say(f"compose: models one-shot exited 0, crfiqa ready after {time.monotonic() - t0:.1f} s")

        wait_for("Prometheus ready", lambda: httpx.get(purl + "/-/ready", timeout=2).status_code == 200, 60)
        version = prom(purl, "/api/v1/status/buildinfo")["version"]

        def target_up() -> dict | None:
            targets = prom(purl, "/api/v1/targets")["activeTargets"]
            mine = [t for t in targets if t["labels"].get("job") == "crfiqa"]
            return mine[0] if mine and mine[0]["health"] == "up" else None
        target = wait_for("crfiqa target up", target_up, 60, every=1)
        up = prom(purl, "/api/v1/query", query='up{job="crfiqa"}')["result"]
        if [s["value"][1] for s in up] != ["1"]:
            raise Failed(f'up{{job="crfiqa"}} = {up}')
        say(f"Prometheus {version}: target {target['scrapeUrl']} health up, up{{job=\"crfiqa\"}} == 1")

        rules_file = yaml.safe_load((REPO / "docker" / "prometheus" / "alerts.yml").read_text())
        want = {r["alert"] for g in rules_file["groups"] for r in g["rules"] if "alert" in r}
        n_want = sum(len(g["rules"]) for g in rules_file["groups"])

        def rules_evaluated() -> list[dict] | None:
            rules = [r for g in prom(purl, "/api/v1/rules")["groups"] for r in g["rules"]]
            return rules if len(rules) == n_want and all(r.get("lastEvaluation", "0001")[:4] != "0001"
                                                         for r in rules) else None
        rules = wait_for("alert rules loaded and evaluated", rules_evaluated, 60, every=1)
        alerts = {r["name"] for r in rules if r["type"] == "alerting"}
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        if alerts != want or bad:
            raise Failed(f"rules: alerts {sorted(alerts)} vs file {sorted(want)}; unhealthy {bad}")
        say(f"rules: {len(rules)} loaded ({len(alerts)} alerts), all evaluated with health ok")

        for _ in range(3):
            r = post_images(url)
            if r.status_code != 200 or len(r.json()["results"][0]["faces"]) != 6:
                raise Failed(f"POST through compose: {r.status_code} {r.text[:300]}")

        def scored() -> float | None:
            res = prom(purl, "/api/v1/query", query='sum(crfiqa_quality_score_count{job="crfiqa"})')["result"]
            return float(res[0]["value"][1]) if res and float(res[0]["value"][1]) >= 18 else None
        n = wait_for("crfiqa_quality_score samples in Prometheus", scored, 60, every=1)
        rng = prom(purl, "/api/v1/query", query='count_over_time(crfiqa_quality_score_count{job="crfiqa"}[5m])')
        say(f"after 3 requests: Prometheus has crfiqa_quality_score_count = {n:.0f} "
            f"({rng['result'][0]['value'][1]} scrapes in the last 5 min)")
        check_dashboard_queries(purl)
    except BaseException:
        print(sh(*COMPOSE, "-p", "crfiqa-e2e", "-f", str(REPO / "docker-compose.yml"), "logs", "--tail", "30",
                 timeout=60, env=env, check=False), file=sys.stderr)
        raise
    finally:
        compose(env, "down", "-v", "--remove-orphans", timeout=120)
    say(f"compose stack checked and removed in {time.monotonic() - t0:.1f} s")


def check_dashboard_queries(purl: str) -> None:
    """Every Grafana panel query runs in the real Prometheus (Grafana itself cannot run here)."""
    board = json.loads((REPO / "docker" / "grafana" / "dashboards" / "crfiqa.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]
    empty = []
    for expr in exprs:
        # Grafana's interval variables, should a panel use them, become a fixed window for the API.
        query = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
        if not prom(purl, "/api/v1/query", query=query)["result"]:
            empty.append(expr)
    must = {"crfiqa_model_info", "crfiqa_ready", "max(crfiqa_queue_depth)"}
    if must & set(empty):
        raise Failed(f"dashboard queries without data: {sorted(must & set(empty))}")
    say(f"dashboard: all {len(exprs)} panel queries run in Prometheus, {len(exprs) - len(empty)} have data now")


# --- apt mirror ------------------------------------------------------------------------------------------

def apt_mirror(root: Path = Path("/etc/apt")) -> str:
    """The URI apt uses for Debian bookworm main (deb822 .sources or one-line .list); deb.debian.org else."""
    files = [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list")),
             *sorted((root / "sources.list.d").glob("*.sources"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", block, re.M))
                if ("deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split()
                        and fields.get("Enabled", "yes") != "no"):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if m:
                    return m.group(1)
    return "http://deb.debian.org/debian"


def main() -> int:
    """Command line: apt-mirror | container | compose."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("apt-mirror")
    for name in ("container", "compose"):
        s = sub.add_parser(name)
        s.add_argument("--image", required=True)
        s.add_argument("--models", type=Path, required=True)
        if name == "compose":
            s.add_argument("--prometheus-image", required=True)
    args = p.parse_args()
    try:
        if args.cmd == "apt-mirror":
            print(apt_mirror())
        elif args.cmd == "container":
            check_container(args.image, args.models.resolve())
        else:
            check_compose(args.image, args.prometheus_image, args.models.resolve())
    except Failed as exc:
        print(f"e2e check FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

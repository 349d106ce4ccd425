"""benchmarks/gpu.sh's Python side on this CPU machine: it refuses to report CPU numbers as GPU numbers,
and its dry run (every table, real models and LFW faces) runs end to end, so the first lent GPU runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, SHARED_MODELS

BENCH = REPO / "benchmarks"


def _run(*args: str) -> subprocess.CompletedProcess:
    """One benchmark script in a child process (as gpu.sh runs it), its output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_gpu_bench_exits_when_cuda_is_not_the_provider() -> None:
    run = _run(str(BENCH / "gpu_bench.py"), "--models-dir", str(SHARED_MODELS), "--images", "8",
               "--seconds", "0.2", "--batch-sizes", "1")
    assert run.returncode != 0
    assert "CUDAExecutionProvider" in run.stderr
    assert "faces/s" not in run.stdout  # no table is printed from the CPU


def test_gpu_bench_dry_run_prints_every_table() -> None:
    run = _run(str(BENCH / "gpu_bench.py"), "--allow-cpu", "--models-dir", str(SHARED_MODELS), "--images", "16",
               "--seconds", "0.2", "--batch-sizes", "1,4", "--detect-batch", "4")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(r"fp16 vs fp32 on \d+ faces: largest score difference [\d.]+ points.*-> clean", out)
    rows = {int(m[1]): (float(m[2]), float(m[3])) for m in re.finditer(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)}
    assert sorted(rows) == [1, 4] and all(v > 0 for pair in rows.values() for v in pair)
    detect = re.search(r"per image ([\d.]+), batched x4 ([\d.]+)", out)
    e2e = re.search(r"Pipeline.run ([\d.]+), with batched detection ([\d.]+)", out)
    assert detect and e2e and min(map(float, detect.groups() + e2e.groups())) > 0


def test_train_throughput_runs_and_reports_samples_per_second() -> None:
    run = _run(str(BENCH / "train_throughput.py"), "--backbones", "mobilefacenet", "--batch-sizes", "4",
               "--steps", "2")
    assert run.returncode == 0, run.stderr
    row = re.search(r"^mobilefacenet\s+([\d.]+)$", run.stdout, re.M)
    assert row and float(row[1]) > 0


def test_gpu_sh_with_a_given_python_installs_nothing_and_fails_both_parts_on_the_cpu(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(venv)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GPU_PYTHON": sys.executable})
    assert run.returncode == 1 and not venv.exists()  # no venv made, nothing installed
    assert "GPU_PYTHON: no install" in run.stdout
    assert "CUDAExecutionProvider is not available" in run.stderr  # the ONNX Runtime part
    assert "torch sees no CUDA device" in run.stderr  # the training part ran its check all the same
    assert "FAIL: a part above did not run on the GPU" in run.stderr

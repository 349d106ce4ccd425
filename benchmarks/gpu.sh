#!/usr/bin/env bash
# GPU numbers in one prepared run, on a CUDA machine:
#   bash benchmarks/gpu.sh [VENV_DIR]          (default: a fresh venv in /tmp/crfiqa-gpu-venv)
# 1. installs crfiqa[gpu,train] into a fresh venv: onnxruntime-gpu only (the CPU onnxruntime beside it would
#    shadow the CUDA provider), torch from PyPI (CUDA build on Linux x86-64);
# 2. asserts that CUDAExecutionProvider is the provider in use (benchmarks/gpu_bench.py exits otherwise);
# 3. prints quality faces/s at batch 1/32/128 in fp32 and fp16 (score parity checked first), detection img/s
#    (per image and batched), end-to-end img/s, and iresnet50 bf16 training samples/s.
# Env: CRFIQA_SHARED (default ../shared beside the checkout), PYTHON (default python3), PIP_ARGS (extra pip flags),
#      GPU_PYTHON: an environment that already holds crfiqa with onnxruntime-gpu and a CUDA torch (a machine
#      with no package index): used as it is, no venv, no pip.
# The ONNX Runtime part and the training part run whatever the other gave; the exit status is non-zero if
# either failed (a CUDA torch without onnxruntime-gpu still gets its training numbers).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${CRFIQA_SHARED:-$REPO/../shared}"
VENV="${1:-/tmp/crfiqa-gpu-venv}"
PYTHON="${PYTHON:-python3}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ -n "${GPU_PYTHON:-}" ]; then
    PY="$GPU_PYTHON"
    echo "== using $PY as it is (GPU_PYTHON: no install)"
else
    echo "== fresh venv $VENV"
    "$PYTHON" -m venv --clear "$VENV" || exit 1
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet ${PIP_ARGS:-} "$REPO[gpu,train]" || exit 1
    if "$VENV/bin/pip" show onnxruntime >/dev/null 2>&1; then
        echo "FAIL: the CPU onnxruntime got installed beside onnxruntime-gpu (it shadows CUDAExecutionProvider)" >&2
        "$VENV/bin/pip" show onnxruntime >&2
        exit 1
    fi
    PY="$VENV/bin/python"
fi
"$PY" -m pip list 2>/dev/null | grep -Ei '^(onnxruntime|torch|onnx|onnxconverter)' || true

cd /tmp || exit 1  # import the installed package, not the checkout
status=0
echo "== ONNX Runtime (quality fp32/fp16, detection, end to end)"
CRFIQA_SHARED="$SHARED" "$PY" "$REPO/benchmarks/gpu_bench.py" --models-dir "$SHARED/models" || status=1

echo "== training throughput (bf16 autocast)"
if "$PY" -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'; then
    "$PY" "$REPO/benchmarks/train_throughput.py" --backbones iresnet50 --batch-sizes 64,128,256 --steps 20 || status=1
else
    status=1
fi
[ "$status" = 0 ] || echo "FAIL: a part above did not run on the GPU" >&2
exit "$status"

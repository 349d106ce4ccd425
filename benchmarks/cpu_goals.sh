#!/usr/bin/env bash
# Every CPU figure of the speed goals (issue 13) in one run, one benchmark after another on the same
# machine, each table also saved under OUT_DIR (default /tmp/crfiqa-cpu-goals):
#   bash benchmarks/cpu_goals.sh [OUT_DIR]      (about 10 minutes on 2 cores)
# 1. export as fast as its source       benchmarks/export_speed.py
# 2. detection sized to the image       benchmarks/detect_size.py (recall, landmarks, img/s vs 640)
# 3. end to end vs the naive chain      benchmarks/compare.py (img/s and the ratio)
# 4. stage rates and CPU per image      benchmarks/pipeline.py
# 5. cost growth                        benchmarks/pipeline.py --growth
# 6. the service at 1/4/16 clients      benchmarks/service.py (ratio to the in-process rate; a raw client,
#                                       then httpx's AsyncClient, which costs ~10x its CPU per request)
# 7. where one client's time goes       benchmarks/lone_request.py
# Run it on an otherwise idle machine: the load average is printed before each step.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-/tmp/crfiqa-cpu-goals}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
mkdir -p "$OUT"
cd "$REPO"
step() {  # step NAME ARGS...: run one benchmark, print and save its output
  local name=$1; shift
  echo "== $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1 /proc/loadavg)): $*"
  "$PY" "$@" 2>&1 | tee "$OUT/$name.txt"
}
lscpu | grep -E '^(Model name|CPU\(s\)):' || true
step export benchmarks/export_speed.py --rounds 9
step detect_size benchmarks/detect_size.py
step compare benchmarks/compare.py --images 256 --rounds 3
step pipeline benchmarks/pipeline.py --images 256 --providers CPUExecutionProvider
step growth benchmarks/pipeline.py --growth --images 96
step service benchmarks/service.py --images 160 --clients 1,4,16 --loop-probe-mb 0 --repeat 3
step service_httpx benchmarks/service.py --images 160 --clients 1,4 --loop-probe-mb 0 --repeat 3 --client httpx
step lone_request benchmarks/lone_request.py --images 80 --rounds 3
echo "== done $(date -u +%H:%M:%S) UTC: tables in $OUT"

#!/usr/bin/env bash
# Set up crfiqa on a fresh machine: a virtual environment at .venv/ with the `crfiqa` command and the
# models of the manifest (copied from a mirror directory when one exists, else downloaded).
#   CRFIQA_EXTRAS   pip extras to install (default: dev = cpu + train + eval + test tools)
#   CRFIQA_MODEL_MIRROR  directory laid out like models/ (default: ../shared/models when present)
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${CRFIQA_EXTRAS:-dev}]"
mirror=${CRFIQA_MODEL_MIRROR:-../shared/models}
if [ -d "$mirror" ]; then
  .venv/bin/crfiqa models fetch --quiet --from "$mirror"
else
  .venv/bin/crfiqa models fetch
fi

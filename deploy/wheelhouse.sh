#!/usr/bin/env bash
# Fill a wheelhouse for an offline image build: every wheel that `pip install ".[EXTRA]"` needs inside
# docker/Dockerfile(.gpu) — the dependencies of crfiqa[EXTRA] and the build backend — for the image's
# CPython 3.11 on manylinux x86_64, downloaded on this host (pip download --only-binary, so the host's own
# Python and platform do not matter). crfiqa itself is built from source inside the image.
#   deploy/wheelhouse.sh DIR [cpu|gpu]
#   CRFIQA_CONSTRAINTS  pip constraints file (deploy/e2e.sh: `pip freeze` of the tested venv)
#   PYTHON              a python with pip (default: .venv/bin/python, else python3)
set -euo pipefail
dir=${1:?usage: deploy/wheelhouse.sh DIR [cpu|gpu]}
extra=${2:-cpu}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The wheel of crfiqa gives pip download the dependency list (pyproject.toml) without a build in the image.
"$py" -m pip wheel -q --no-deps --wheel-dir "$tmp" "$repo"
wheel=$(ls "$tmp"/crfiqa-*.whl)
# pip does not expand manylinux_2_X to older tags by itself: name every glibc up to Debian 12's 2.36.
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
constraints=()
[ -n "${CRFIQA_CONSTRAINTS:-}" ] && constraints=(--constraint "$CRFIQA_CONSTRAINTS")
# (The grep drops pip's noise about configured local index folders that lack a package.)
"$py" -m pip download -q --disable-pip-version-check --dest "$dir" --only-binary=:all: \
  --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${platforms[@]}" \
  "${constraints[@]}" "$wheel[$extra]" "setuptools>=69" "wheel" 2> >(grep -v 'is ignored: it is neither' >&2)
rm -f "$dir"/crfiqa-*.whl
echo "wheelhouse $dir: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1)"

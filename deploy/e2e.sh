#!/usr/bin/env bash
# The images and the compose stack for real, on this host (run by .ci/run):
#   1. Docker engine: the Debian packages when missing; a private dockerd when none answers.
#   2. Base image: python:3.11-slim when a registry serves it, else Debian 12 from the mirror apt uses
#      (debootstrap --variant=minbase + docker import; the rootfs tar is cached).
#   3. A wheelhouse built on the host (deploy/wheelhouse.sh, pinned to the tested venv) -> the CPU image,
#      installed with --no-index; the Prometheus image from Debian's package when prom/prometheus is absent.
#   4. deploy/e2e_checks.py: the container (scores = host `crfiqa score`, /metrics, uid, health, SIGTERM
#      drain, size) and the compose stack (Prometheus target up, rules loaded, score samples).
#   5. Clean-up of everything started here, by PID: containers, compose project, dockerd, its containerd,
#      docker0, the iptables DOCKER chains, mounts under its roots.
# Environment:
#   CRFIQA_DOCKER_CACHE  cache outside the repo (default ${XDG_CACHE_HOME:-/var/cache}/crfiqa-docker):
#                        docker data root, rootfs tar, wheelhouses. Delete it for a cold run.
#   CRFIQA_DOCKER_GPU=1  also build docker/Dockerfile.gpu and check its providers (CUDA cannot run here).
#   CRFIQA_E2E_MODELS    models directory for the container (default ../shared/models, else ./models).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${CRFIQA_DOCKER_CACHE:-${XDG_CACHE_HOME:-/var/cache}/crfiqa-docker}
case "$cache/" in "$repo"/*) echo "e2e: the cache must be outside the repository" >&2; exit 2 ;; esac
mkdir -p "$cache/run"
exec 9>"$cache/lock"
flock -w 1800 9  # one e2e per cache at a time (the data root is not shareable)
start=$SECONDS
log() { printf '[e2e %4ss] %s\n' "$((SECONDS - start))" "$*"; }
py=$repo/.venv/bin/python
[ -x "$py" ] || { echo "e2e: run ./setup.sh first (needs .venv)" >&2; exit 2; }

# --- 1. tools -------------------------------------------------------------------------------------------
missing=()
for pair in dockerd:docker.io containerd:containerd runc:runc iptables:iptables debootstrap:debootstrap \
            docker-compose:docker-compose; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# The engine's own client (docker.io) when present; any docker CLI otherwise. Legacy builder: BuildKit
# needs buildx, which Debian 12 does not package.
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
export DOCKER DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
if "$DOCKER" compose version >/dev/null 2>&1; then COMPOSE="$DOCKER compose"; else COMPOSE=docker-compose; fi
export COMPOSE

# --- 2. engine ------------------------------------------------------------------------------------------
dockerd_pid=""
pre_bridge=0; pre_chains=""; pre_forward=""; pre_ipfwd=""
data=$cache/data exec_root=$cache/exec sock=$cache/run/docker.sock pidfile=$cache/run/dockerd.pid

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "${DOCKER_HOST:-}" ] || [ -n "$dockerd_pid" ] || "$DOCKER" info >/dev/null 2>&1; then
    $COMPOSE -p crfiqa-e2e -f "$repo/docker-compose.yml" down -v --remove-orphans >/dev/null 2>&1
    ids=$("$DOCKER" ps -aq --filter label=crfiqa-e2e 2>/dev/null)
    [ -n "$ids" ] && "$DOCKER" rm -f $ids >/dev/null 2>&1
  fi
  if [ -n "$dockerd_pid" ]; then
    log "stopping dockerd (pid $dockerd_pid) and cleaning up after it"
    local cpid
    cpid=$(cat "$exec_root/containerd/containerd.pid" 2>/dev/null)
    kill -TERM "$dockerd_pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$dockerd_pid" 2>/dev/null
    if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null && grep -q containerd "/proc/$cpid/comm"; then
      kill -TERM "$cpid"; sleep 1; kill -KILL "$cpid" 2>/dev/null
    fi
    # Mounts dockerd leaves (nsfs under exec-root/netns, overlays of killed containers), deepest first.
    awk -v a="$exec_root" -v b="$data" '$5 ~ "^"a || $5 ~ "^"b {print $5}' /proc/self/mountinfo \
      | sort -r | while read -r m; do umount -l "$m"; done
    [ "$pre_bridge" = 0 ] && ip link show docker0 >/dev/null 2>&1 && ip link delete docker0
    for table in filter nat; do
      # Rules that jump to or mention the DOCKER chains or docker0, then the chains themselves.
      iptables -t "$table" -S 2>/dev/null | grep -E '^-A' | grep -E 'DOCKER|docker0' \
        | grep -vE '^-A DOCKER' | while read -r rule; do
          read -ra args <<<"${rule/#-A/-D}"; iptables -t "$table" "${args[@]}"
        done
      for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
        grep -qx "$table:$chain" <<<"$pre_chains" && continue
        iptables -t "$table" -F "$chain"
      done
      for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
        grep -qx "$table:$chain" <<<"$pre_chains" || iptables -t "$table" -X "$chain"
      done
    done
    [ -n "$pre_forward" ] && iptables -P FORWARD "$pre_forward"
    [ -n "$pre_ipfwd" ] && sysctl -qw "net.ipv4.ip_forward=$pre_ipfwd"
    rm -f "$pidfile" "$sock" "$cache/run/prestate"
  fi
  log "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${DOCKER_HOST:-}" ] && "$DOCKER" info >/dev/null 2>&1; then
  log "using the running Docker engine"
else
  if [ -S "$sock" ] && [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
      && grep -q dockerd "/proc/$(cat "$pidfile")/comm"; then
    dockerd_pid=$(cat "$pidfile")  # left by an interrupted run: adopt it, clean up after it
    # shellcheck disable=SC1091
    [ -f "$cache/run/prestate" ] && . "$cache/run/prestate"
    log "adopting dockerd pid $dockerd_pid"
  else
    pre_bridge=$(ip link show docker0 >/dev/null 2>&1 && echo 1 || echo 0)
    pre_chains=$(for t in filter nat; do iptables -t "$t" -S 2>/dev/null \
      | awk -v t="$t" '$1 == "-N" && $2 ~ /^DOCKER/ {print t":"$2}'; done)
    pre_forward=$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')
    pre_ipfwd=$(sysctl -n net.ipv4.ip_forward)
    # What the host had before this dockerd, for the clean-up (also of an interrupted run that is adopted).
    printf 'pre_bridge=%q\npre_chains=%q\npre_forward=%q\npre_ipfwd=%q\n' \
      "$pre_bridge" "$pre_chains" "$pre_forward" "$pre_ipfwd" >"$cache/run/prestate"
    # The uplink's MTU for the bridge: a larger one breaks TLS/large transfers through the NAT.
    mtu=$(ip route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' \
      | head -1 | xargs -r -I{} cat /sys/class/net/{}/mtu)
    mkdir -p "$data" "$exec_root"
    dockerd --data-root "$data" --exec-root "$exec_root" --pidfile "$pidfile" -H "unix://$sock" \
      ${mtu:+--mtu "$mtu"} >"$cache/run/dockerd.log" 2>&1 &
    dockerd_pid=$!
    log "started dockerd pid $dockerd_pid (data root $data)"
  fi
  export DOCKER_HOST=unix://$sock
  for _ in $(seq 1 150); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
  "$DOCKER" info >/dev/null || { tail -20 "$cache/run/dockerd.log"; exit 1; }
fi
log "engine $("$DOCKER" version -f '{{.Server.Version}}'), compose: $COMPOSE"

# --- 3. base images -------------------------------------------------------------------------------------
registry_image() {  # present locally, or pullable (fails fast: no registry reachable here)
  "$DOCKER" image inspect "$1" >/dev/null 2>&1 || timeout 120 "$DOCKER" pull -q "$1" >/dev/null 2>&1
}
if [ -n "${CRFIQA_BASE_IMAGE:-}" ]; then
  base=$CRFIQA_BASE_IMAGE
elif registry_image python:3.11-slim; then
  base=python:3.11-slim
else
  debian=crfiqa-e2e/debian:bookworm-minbase
  if ! "$DOCKER" image inspect "$debian" >/dev/null 2>&1; then
    tar=$cache/debian-bookworm-minbase.tar
    if [ ! -s "$tar" ]; then
      mirror=$("$py" deploy/e2e_checks.py apt-mirror)
      log "no registry: debootstrap --variant=minbase bookworm from $mirror"
      rootfs=$(mktemp -d "$cache/rootfs.XXXX")
      if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/run/debootstrap.log" 2>&1; then
        tail -20 "$cache/run/debootstrap.log"
        awk -v r="$rootfs" '$5 ~ "^"r {print $5}' /proc/self/mountinfo | sort -r | xargs -r umount -l
        rm -rf "$rootfs"; exit 1
      fi
      # Slim like debian:*-slim: no package caches, and dpkg skips docs (but copyrights), man pages and
      # translations.
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
      find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
      { printf 'path-exclude /usr/share/%s/*\n' doc man locale info
        echo 'path-include /usr/share/doc/*/copyright'; } >"$rootfs/etc/dpkg/dpkg.cfg.d/01-slim"
      tar --numeric-owner -C "$rootfs" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
      rm -rf "$rootfs"
    fi
    log "docker import $tar -> $debian"
    "$DOCKER" import -c 'CMD ["bash"]' "$tar" "$debian" >/dev/null
  fi
  base=crfiqa-e2e/python:3.11-bookworm
  log "Python base $base (Debian's python3 on $debian)"
  "$DOCKER" build -q --build-arg BASE_IMAGE="$debian" -t "$base" -f deploy/offline/python.Dockerfile \
    deploy/offline >/dev/null
fi
"$DOCKER" run --rm "$base" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'

# --- 4. wheelhouse and images ---------------------------------------------------------------------------
# Build context = the files git would commit (tracked + untracked, not ignored), plus the wheelhouse at
# docker/wheelhouse: exactly what a clean checkout with a filled wheelhouse holds; the repo is not written.
build_image() {  # build_image EXTRA DOCKERFILE TAG
  local extra=$1 dockerfile=$2 tag=$3 key wh
  "$repo/.venv/bin/pip" freeze --exclude-editable >"$cache/run/constraints.txt"
  key=$(cat pyproject.toml "$cache/run/constraints.txt" | sha256sum | cut -c1-16)
  wh=$cache/wheelhouse/$extra-$key
  if [ ! -f "$wh/.complete" ]; then
    log "wheelhouse $wh"
    rm -rf "$wh"
    CRFIQA_CONSTRAINTS=$cache/run/constraints.txt PYTHON=$py deploy/wheelhouse.sh "$wh" "$extra"
    touch "$wh/.complete"
  fi
  log "docker build -f $dockerfile --build-arg BASE_IMAGE=$base -t $tag ($(ls "$wh" | wc -l) wheels)"
  local ctx=$cache/run/context
  rm -rf "$ctx" && mkdir -p "$ctx"
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$ctx"
  cp -l "$wh"/*.whl "$ctx/docker/wheelhouse/" 2>/dev/null || cp "$wh"/*.whl "$ctx/docker/wheelhouse/"
  # --network none: the build must not need the network at all, only the wheelhouse.
  "$DOCKER" build -q --network none --build-arg BASE_IMAGE="$base" -f "$ctx/$dockerfile" -t "$tag" "$ctx" \
    >/dev/null
  rm -rf "$ctx"
}
build_image cpu docker/Dockerfile crfiqa:cpu

if registry_image prom/prometheus:v2.53.3; then
  prometheus=prom/prometheus:v2.53.3
else
  prometheus=crfiqa-e2e/prometheus:debian
  log "no registry: $prometheus from Debian's prometheus package on ${debian:-$base}"
  "$DOCKER" build -q --build-arg BASE_IMAGE="${debian:-$base}" -t "$prometheus" \
    -f docker/prometheus/Dockerfile.debian docker/prometheus >/dev/null
fi

if [ "${CRFIQA_DOCKER_GPU:-0}" = 1 ]; then
  gpu_base=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
  registry_image "$gpu_base" || gpu_base=$base
  log "GPU image on $gpu_base (CUDA cannot run on this host: only the build and the provider list are checked)"
  base_saved=$base; base=$gpu_base
  build_image gpu docker/Dockerfile.gpu crfiqa:gpu
  base=$base_saved
  "$DOCKER" run --rm --label crfiqa-e2e crfiqa:gpu python3.11 -c \
    "import onnxruntime as o; p = o.get_available_providers(); print('crfiqa:gpu providers', p); \
assert 'CUDAExecutionProvider' in p"
  "$DOCKER" run --rm --label crfiqa-e2e crfiqa:gpu python3.11 -c \
    "import importlib.metadata as m; n = {d.metadata['Name'].lower() for d in m.distributions()}; \
assert 'onnxruntime' not in n and 'onnxruntime-gpu' in n, n"
fi

# --- 5. checks ------------------------------------------------------------------------------------------
models=${CRFIQA_E2E_MODELS:-}
[ -z "$models" ] && { [ -d "$repo/../shared/models" ] && models=$(cd "$repo/../shared/models" && pwd) || models=$repo/models; }
log "checks: container crfiqa:cpu, then compose with $prometheus (models $models)"
"$py" deploy/e2e_checks.py container --image crfiqa:cpu --models "$models"
"$py" deploy/e2e_checks.py compose --image crfiqa:cpu --prometheus-image "$prometheus" --models "$models"
images=(crfiqa:cpu "$prometheus" "$base")
[ "${CRFIQA_DOCKER_GPU:-0}" = 1 ] && images+=(crfiqa:gpu)
for image in "${images[@]}"; do
  log "image $image: $(( $("$DOCKER" image inspect -f '{{.Size}}' "$image") / 1000000 )) MB"
done
log "all Docker checks passed"

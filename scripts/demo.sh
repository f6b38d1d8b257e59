#!/usr/bin/env bash
# Quickstart: install, start a local plane (SQLite) and two agents, run the example DAGs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"

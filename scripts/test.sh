#!/usr/bin/env bash
# The whole test suite (unit + end-to-end on SQLite and PostgreSQL). Extra args go to pytest,
# e.g. scripts/test.sh -m "not e2e" for the quick inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check --no-cache airflow_remote_execution scripts bench tests
exec .venv/bin/python -m pytest "$@"

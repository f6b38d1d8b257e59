#!/usr/bin/env bash
# The whole test suite (unit + end-to-end on SQLite and PostgreSQL). Extra args go to pytest,
# e.g. scripts/test.sh -m "not e2e" for the quick inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check --no-cache airflow_remote_execution scripts bench tests
# Test files run in parallel (one process each; a module's plane stays in its process): most of an
# end-to-end test's time is waiting on real processes. PYTEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-3}" --dist loadfile "$@"

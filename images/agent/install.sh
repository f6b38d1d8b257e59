#!/bin/sh
# Installs airflow-remote-execution (with $EXTRAS) and its dependencies, pinned by constraints.txt,
# into the base image's Python environment. Runs as the airflow user during `podman/docker build`.
# /tmp/rex/wheels holds the provider's wheel and, for an offline build (OFFLINE=1, the tests'
# `--network none`), every dependency's wheel; otherwise the dependencies come from PyPI.
set -eu
cd /tmp/rex
provider=$(ls wheels/airflow_remote_execution-*.whl | head -n1)
version=$(basename "$provider" | cut -d- -f2)
index="--find-links /tmp/rex/wheels"
[ "${OFFLINE:-0}" = 1 ] && index="$index --no-index"

if python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  # A virtualenv (the official image's and the local base's layout): uv, because pip's resolver does not
  # finish on the google provider's tree. uv itself goes to a temporary directory and is not kept.
  python -m pip install --quiet --disable-pip-version-check --no-cache-dir $index --target /tmp/rex/uv \
    "$(grep '^uv==' constraints.txt || echo "uv==${UV_VERSION}")"
  PYTHONPATH=/tmp/rex/uv python -m uv pip install --python "$(command -v python)" --no-cache --compile-bytecode \
    $index -c constraints.txt "airflow-remote-execution[${EXTRAS}]==${version}"
else
  python -m pip install --no-cache-dir $index -c constraints.txt "airflow-remote-execution[${EXTRAS}]==${version}"
fi
# Fail the build here, not in a customer's cluster, if the entry point or the sentinel is missing
# (in a throwaway AIRFLOW_HOME: nothing of this check stays in the image).
export AIRFLOW_HOME=/tmp/rex/home
airflow remote-execution sentinel --help >/dev/null
airflow remote-execution agent start --help >/dev/null
python -c 'import airflow_remote_execution.agent.sentinel'

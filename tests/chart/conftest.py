"""helm 4 and helm 3 (installed into .venv/bin by scripts/system-deps.sh) and rendering helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# REX_CHART_DIR: render another copy of the chart (e.g. a deliberately broken one, to see a test fail)
CHART = Path(os.environ.get("REX_CHART_DIR") or ROOT / "chart")
VALUES = Path(__file__).parent / "values"
VALUES_FILES = sorted(VALUES.glob("*.yaml"))
BIN = ROOT / ".venv" / "bin"
HELMS = {"helm4": BIN / "helm", "helm3": BIN / "helm3"}
# The oldest and newest Kubernetes minor the chart supports (native sidecars and the pod-index label
# need 1.29; kubernetes-validate 1.37.0 carries schemas up to 1.37).
KUBE_VERSIONS = ("1.29.0", "1.37.0")


def helm_path(name: str) -> Path:
    path = HELMS[name]
    if not path.exists():
        found = shutil.which("helm" if name == "helm4" else "helm3")
        if not found:
            pytest.skip(f"{name} is not installed (scripts/system-deps.sh installs it into .venv/bin)")
        path = Path(found)
    return path


_HELM_HOME = tempfile.mkdtemp(prefix="rex-helm-")
HELM_ENV = {**os.environ, "HELM_CACHE_HOME": _HELM_HOME, "HELM_CONFIG_HOME": _HELM_HOME, "HELM_DATA_HOME": _HELM_HOME}


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm_path(helm)), *args], capture_output=True, text=True, env=HELM_ENV, timeout=60)


def values_args(values: Path | dict | None, tmp: Path | None = None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, dict):
        fd, name = tempfile.mkstemp(suffix=".json", dir=tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
        values = Path(name)
    return ["-f", str(values)]


def template(values: Path | dict | None = None, helm: str = "helm4", kube_version: str = KUBE_VERSIONS[-1],
             release: str = "rel", check: bool = True) -> subprocess.CompletedProcess:
    result = run_helm(helm, "template", release, str(CHART), "--kube-version", kube_version, *values_args(values))
    if check and result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return result


def render(values: Path | dict | None = None, **kwargs) -> list[dict]:
    return [o for o in yaml.safe_load_all(template(values, **kwargs).stdout) if o]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def load_values(name: str) -> dict:
    return yaml.safe_load((VALUES / f"{name}.yaml").read_text())

"""The committed UI bundle (airflow_remote_execution/www) is what ui/ builds, and the plugin offers it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from airflow_remote_execution.plane.api import ui_routes

ROOT = Path(__file__).parents[3]
UI = ROOT / "ui"
WWW = ROOT / "airflow_remote_execution" / "www"
INPUTS = ("package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "src")  # as ui/build-info.mjs


def sources_digest() -> str:
    """The same digest as ``ui/build-info.mjs``: SHA-256 over "path NUL sha256(file)" lines, sorted by path."""
    paths = sorted(
        p.relative_to(UI).as_posix()
        for name in INPUTS
        for p in ([UI / name] if (UI / name).is_file() else (UI / name).rglob("*"))
        if p.is_file()
    )
    lines = "".join(f"{p}\0{hashlib.sha256((UI / p).read_bytes()).hexdigest()}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_committed_bundle_was_built_from_these_sources():
    recorded = json.loads((WWW / "build-info.json").read_text())
    assert recorded["sources_sha256"] == sources_digest(), (
        "ui/ changed since the bundle was built: run `npm run build --prefix ui` and commit airflow_remote_execution/www"
    )
    assert recorded["bundle_sha256"] == hashlib.sha256((WWW / "remote-agents.js").read_bytes()).hexdigest(), (
        "airflow_remote_execution/www/remote-agents.js is not the bundle the build recorded (edited by hand?)"
    )


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_rebuilding_gives_the_committed_bytes(tmp_path):
    vite = UI / "node_modules" / ".bin" / "vite"
    assert vite.exists(), "ui/node_modules is missing: run scripts/bootstrap.sh (npm ci --prefix ui)"
    env = {**os.environ, "REX_UI_OUT_DIR": str(tmp_path)}
    result = subprocess.run([str(vite), "build", "--logLevel", "error"], cwd=UI, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "remote-agents.js").read_bytes() == (WWW / "remote-agents.js").read_bytes(), (
        "ui/ builds another bundle than the committed one: run `npm run build --prefix ui` and commit it"
    )


def test_bundle_is_a_umd_library_on_the_host_pages_globals():
    text = (WWW / "remote-agents.js").read_text()
    assert ".AirflowPlugin=" in text
    for host_global in ("e.ChakraUI", "e.React", "e.ReactJSXRuntime"):
        assert host_global in text
    # Neither React nor Chakra is bundled (the host's own instances give the theme and hooks).
    assert "createElement(" not in text and "__SECRET_INTERNALS" not in text and len(text) < 100_000


def test_react_apps_nav_page_and_task_instance_tab():
    nav, tab = ui_routes.react_apps("/airflow/")
    assert (nav["name"], nav["destination"], nav["url_route"], nav["nav_top_level"]) == (
        "Remote Agents", "nav", "remote-agents", True)
    assert (tab["name"], tab["destination"], tab["url_route"]) == ("Remote execution", "task_instance", "remote-execution")
    # Each app its own URL: the UI import()s a URL once, then reads globalThis.AirflowPlugin.
    assert nav["bundle_url"].startswith("/airflow/remote_execution/ui/remote-agents.js?v=")
    assert tab["bundle_url"] != nav["bundle_url"] and tab["bundle_url"].split("?")[0] == nav["bundle_url"].split("?")[0]
    assert nav["icon"] == "/airflow/remote_execution/ui/remote-agents.svg"

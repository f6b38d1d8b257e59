"""The package's shape: documented configuration paths import, and no module imports itself back.

Imports are read from the source (every ``import`` statement, including those under ``TYPE_CHECKING``
and inside functions): a lazy import hides a circle at run time but not from a reader.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import airflow_remote_execution

PACKAGE = "airflow_remote_execution"
ROOT = Path(airflow_remote_execution.__file__).parent

# Paths users put in airflow.cfg or in provider metadata; they must keep working whatever moves.
DOCUMENTED_PATHS = [
    "airflow_remote_execution.executors.RemoteExecutor",
    "airflow_remote_execution.xcom.ObjectStorageXComBackend",
    "airflow_remote_execution.log_handler.LOGGING_CONFIG",
    "airflow_remote_execution.log_handler.REMOTE_TASK_LOG",
    "airflow_remote_execution.plugins.remote_execution_plugin.RemoteExecutionPlugin",
    "airflow_remote_execution.cli.definition.get_cli_commands",
    "airflow_remote_execution.models.db.RemoteExecutionDBManager",
    "airflow_remote_execution.get_provider_info.get_provider_info",
]


@pytest.mark.parametrize("path", DOCUMENTED_PATHS)
def test_documented_path_imports(path):
    module, _, name = path.rpartition(".")
    assert hasattr(importlib.import_module(module), name), path


def test_provider_info_names_importable_paths():
    from airflow_remote_execution.get_provider_info import get_provider_info

    info = get_provider_info()
    paths = [*info["executors"], *info["cli"], *info["db-managers"], *(p["plugin-class"] for p in info["plugins"])]
    assert set(paths) <= set(DOCUMENTED_PATHS), paths
    handler = importlib.import_module("airflow_remote_execution.log_handler").LOGGING_CONFIG["handlers"]["task"]
    module, _, name = handler["class"].rpartition(".")
    assert hasattr(importlib.import_module(module), name)


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        if "migrations" in path.relative_to(ROOT).parts:
            continue  # Alembic scripts, loaded by path
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_agent_side_never_imports_the_plane():
    """The agent speaks only HTTP to the plane: nothing it runs may import plane code or the DB models."""
    graph = import_graph()
    agent_side = [m for m in graph if m.startswith(f"{PACKAGE}.agent.") or m.startswith(f"{PACKAGE}.wire.")]
    assert agent_side
    offenders = {
        m: sorted(t for t in graph[m] if t.startswith((f"{PACKAGE}.plane", f"{PACKAGE}.models", f"{PACKAGE}.executors")))
        for m in agent_side
    }
    assert {m: t for m, t in offenders.items() if t} == {}

"""The one rule for import paths that travel in payloads (deadline callbacks, trigger classes).

A path may name code *installed* where it would run (the standard library, Airflow, providers, any
site-package) only if an administrator allowed it in ``[remote_execution] parsed_dag_import_allowlist``
(fnmatch patterns); otherwise it must name a module of the DAG's own bundle. The plane applies it to
what agents upload, each agent to what it is asked to run. Nothing is imported to decide:
``importlib.util.find_spec`` of a top-level name only looks the module up.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import sys
from functools import cache

from airflow_remote_execution import config

DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def allowlist() -> list[str]:
    return config.split_list(config.get("parsed_dag_import_allowlist"))


def allowed_by_list(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@cache
def installed_here(top: str) -> bool:
    """Whether ``top`` names a module this process could import from its installation (stdlib, builtins,
    site-packages), as opposed to a DAG bundle's own code."""
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def refusal(path: object, patterns: list[str]) -> str | None:
    """Why ``path`` may not be run here, or None if it may: allow-listed, or not installed code."""
    if not isinstance(path, str) or not DOTTED.match(path):
        return f"must be a dotted import path 'module.name', got {path!r}"
    if allowed_by_list(path, patterns) or not installed_here(path.split(".", 1)[0]):
        return None
    return (
        f"{path!r} names installed code, not the DAG bundle's: it must match [remote_execution] "
        f"parsed_dag_import_allowlist (now: {', '.join(patterns) or 'empty'})"
    )

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
import os
import re
import site
import sys
import sysconfig
from functools import cache

from airflow_remote_execution import config

DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def allowlist() -> list[str]:
    return config.split_list(config.get("parsed_dag_import_allowlist"))


def allowed_by_list(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _installation_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()])
    return tuple(dirs)


@cache
def installed_here(top: str) -> bool:
    """Whether ``top`` names a module of this Python installation (builtins, the standard library,
    site-packages, also through a ``.pth`` file's directory), as opposed to a DAG bundle's own code.
    A module found only through a bundle or DAGs folder on ``sys.path`` is not installed."""
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return True
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    if spec.origin and spec.submodule_search_locations is None:
        entries = [os.path.dirname(spec.origin)]  # a module file: found in this sys.path entry
    else:  # a package (or namespace package): its directory sits in the sys.path entry
        entries = [os.path.dirname(p) for p in spec.submodule_search_locations or ()]
    dirs = set(_installation_dirs() + _pth_dirs())
    return any(os.path.realpath(e) in dirs for e in entries)


@cache
def _pth_dirs() -> tuple[str, ...]:
    """Directories ``.pth`` files in site-packages put on sys.path (editable installs): what is directly in
    them is installed code too."""
    found = []
    for directory in _installation_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not name.endswith(".pth"):
                continue
            try:
                with open(os.path.join(directory, name)) as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            found += [os.path.realpath(line.strip()) for line in lines
                      if line.strip() and not line.startswith(("#", "import ")) and os.path.isdir(line.strip())]
    return tuple(found)


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

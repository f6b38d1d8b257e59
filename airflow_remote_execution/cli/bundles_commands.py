"""``airflow remote-execution bundles ...``: build, list, validate and edit dag bundle entries.

Runs on an agent as well as on the plane: nothing here touches the metadata DB. ``--write`` edits
``[dag_processor] dag_bundle_config_list`` in ``airflow.cfg`` as text, so comments and every other
option stay exactly as they were.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import sys
from pathlib import Path

from airflow.cli.simple_table import AirflowConsole
from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution.agent import bundles

SECTION, OPTION = "dag_processor", "dag_bundle_config_list"
ENV_OVERRIDES = tuple(f"AIRFLOW__{SECTION.upper()}__{OPTION.upper()}{s}" for s in ("", "_CMD", "_SECRET"))


def _fail(message: str) -> SystemExit:
    return SystemExit(f"Error: {message}")


def _config_path() -> Path:
    from airflow.configuration import AIRFLOW_CONFIG

    return Path(AIRFLOW_CONFIG)


# ---------------------------------------------------------------------------------------- airflow.cfg


def read_file_entries(path: Path) -> list:
    """The list in the file, or Airflow's default (the dags-folder bundle) when the file does not set it."""
    parser = configparser.ConfigParser(strict=False)
    if path.exists():
        parser.read(path)
    if parser.has_option(SECTION, OPTION):
        raw = parser.get(SECTION, OPTION)
    else:
        from airflow.configuration import conf

        raw = conf.get_default_value(SECTION, OPTION) or "[]"
    return bundles.parse_entries(raw, f"{OPTION} in {path}")


def render_option(entries: list) -> str:
    """``dag_bundle_config_list = [...]`` as configparser continuation lines (``%`` escaped for interpolation)."""
    body = json.dumps(entries, indent=2).replace("%", "%%").splitlines()
    return "\n".join([f"{OPTION} = {body[0]}", *(f"    {line}" for line in body[1:])]) + "\n"


def replace_option(text: str, entries: list) -> str:
    """``text`` with the option set to ``entries``: replaced where it is, else added to the section (or file)."""
    lines = text.splitlines(keepends=True)
    option_re = re.compile(rf"^{OPTION}\s*[=:]", re.IGNORECASE)
    section_at = None
    for i, line in enumerate(lines):
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            if section_at is not None:
                break  # left our section without finding the option
            if header.group(1).strip() == SECTION:
                section_at = i
            continue
        if section_at is not None and option_re.match(line):
            end = i + 1
            while end < len(lines) and lines[end][:1] in (" ", "\t") and lines[end].strip():
                end += 1
            return "".join([*lines[:i], render_option(entries), *lines[end:]])
    if section_at is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{sep}[{SECTION}]\n{render_option(entries)}"
    return "".join([*lines[: section_at + 1], render_option(entries), *lines[section_at + 1 :]])


def write_file_entries(path: Path, entries: list) -> None:
    text = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".rex-tmp")
    tmp.write_text(replace_option(text, entries))
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)
    for var in ENV_OVERRIDES:
        if var in os.environ:
            print(f"Warning: {var} is set and overrides what was written to {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- commands


def _add(entry: dict, args) -> None:
    if not args.skip_checks:
        problems = bundles.validate([entry])
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            raise SystemExit(1)
    if not args.write:
        print(json.dumps(entry, indent=2))
        return
    path = _config_path()
    try:
        current = read_file_entries(path)
    except bundles.BundleConfigError as e:
        raise _fail(str(e)) from None
    if any(isinstance(e, dict) and e.get("name") == entry["name"] for e in current):
        raise _fail(
            f"bundle {entry['name']!r} is already in {path}; "
            f"`airflow remote-execution bundles remove {entry['name']}` first to replace it"
        )
    write_file_entries(path, [*current, entry])
    print(f"Added bundle {entry['name']!r} to [{SECTION}] {OPTION} in {path}")


@providers_configuration_loaded
def bundles_add_git(args) -> None:
    try:
        entry = bundles.git_bundle(
            args.name,
            args.repo_url,
            tracking_ref=args.tracking_ref,
            subdir=args.subdir,
            conn_id=args.conn_id,
            refresh_interval=args.refresh_interval,
            submodules=args.submodules,
        )
    except bundles.BundleConfigError as e:
        raise _fail(str(e)) from None
    _add(entry, args)


@providers_configuration_loaded
def bundles_add_local(args) -> None:
    try:
        entry = bundles.local_bundle(args.name, args.path, refresh_interval=args.refresh_interval)
    except bundles.BundleConfigError as e:
        raise _fail(str(e)) from None
    _add(entry, args)


@providers_configuration_loaded
def bundles_list(args) -> None:
    try:
        entries = bundles.configured_entries()
    except bundles.BundleConfigError as e:
        raise _fail(str(e)) from None
    rows = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kwargs = entry.get("kwargs") or {}
        rows.append(
            {
                "name": entry.get("name"),
                "class": str(entry.get("classpath", "")).rpartition(".")[2],
                "source": kwargs.get("repo_url") or kwargs.get("path") or "",
                "tracking_ref": kwargs.get("tracking_ref", ""),
                "subdir": kwargs.get("subdir", ""),
                "conn_id": kwargs.get("git_conn_id", ""),
                "refresh_interval": kwargs.get("refresh_interval", ""),
            }
        )
    AirflowConsole().print_as(data=rows, output=args.output or "table")


@providers_configuration_loaded
def bundles_validate(args) -> None:
    try:
        entries = bundles.configured_entries()
    except bundles.BundleConfigError as e:
        raise _fail(str(e)) from None
    problems = bundles.validate(entries, remote=not args.offline, timeout=args.timeout)
    for problem in problems:
        print(problem)
    if problems:
        raise SystemExit(1)
    print(f"{len(entries)} bundle(s) OK" + (" (offline: repositories not contacted)" if args.offline else ""))


@providers_configuration_loaded
def bundles_remove(args) -> None:
    path = _config_path()
    try:
        current = read_file_entries(path)
    except bundles.BundleConfigError as e:
        raise _fail(str(e)) from None
    kept = [e for e in current if not (isinstance(e, dict) and e.get("name") == args.name)]
    if len(kept) == len(current):
        names = ", ".join(str(e.get("name")) for e in current if isinstance(e, dict)) or "none"
        raise _fail(f"no bundle {args.name!r} in {path} (bundles there: {names})")
    write_file_entries(path, kept)
    print(f"Removed bundle {args.name!r} from [{SECTION}] {OPTION} in {path}")

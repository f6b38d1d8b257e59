"""
Dag bundle helpers: build and validate ``[dag_processor] dag_bundle_config_list`` entries for
GitDagBundle and LocalDagBundle, and keep an agent's bundle storage from growing forever.

Airflow itself only finds a bad entry when a dag processor or a task first needs the bundle, and
then says little more than "Error cloning repository". :func:`validate` says what is wrong and
what to fix before anything runs. It looks connections up the way an agent does (environment
``AIRFLOW_CONN_*`` and the configured secrets backend, never the metadata DB, which agents lack)
and asks the repository with ``git ls-remote`` under the connection's credentials (GitHook's own
credential helper / SSH command), with a bounded timeout.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import subprocess
import threading
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_remote_execution.agent.checks import CheckResult, check

log = logging.getLogger(__name__)

GIT_BUNDLE = "airflow.providers.git.bundles.git.GitDagBundle"
LOCAL_BUNDLE = "airflow.dag_processing.bundles.local.LocalDagBundle"
ENTRY_KEYS = ("name", "classpath", "kwargs", "team_name")
# Set by DagBundlesManager itself, never by configuration.
MANAGED_KWARGS = frozenset({"name", "version"})
RESERVED_NAMES = frozenset({"example_dags"})
GIT_TIMEOUT = 30.0
_ENV_BACKEND = "airflow.secrets.environment_variables.EnvironmentVariablesBackend"
_SHA = re.compile(r"^[0-9a-f]{7,40}$")


class BundleConfigError(ValueError):
    """A bundle entry that cannot work; the message says what to fix."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one entry (``bundle`` is its name, or ``#index`` when it has none)."""

    bundle: str
    message: str

    def __str__(self) -> str:
        return f"{self.bundle}: {self.message}"


# ---------------------------------------------------------------------------------------- builders


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise BundleConfigError("bundle name must be a non-empty string")
    if name in RESERVED_NAMES:
        raise BundleConfigError(f"bundle name {name!r} is reserved by Airflow; choose another")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise BundleConfigError(f"bundle name {name!r} is used as a directory name: no '/', '\\', '.' or '..'")


def _check_refresh_interval(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BundleConfigError(f"refresh_interval must be a whole number of seconds >= 0, not {value!r}")


def _check_subdir(subdir: str | None) -> None:
    if subdir is None:
        return
    path = PurePosixPath(subdir)
    if not subdir or path.is_absolute() or ".." in path.parts:
        raise BundleConfigError(f"subdir {subdir!r} must be a path relative to the repository root, without '..'")


def _has_embedded_password(url: str) -> bool:
    if not url.startswith(("http://", "https://")):
        return False
    userinfo = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
    return ":" in userinfo


def git_bundle(
    name: str,
    repo_url: str | None = None,
    *,
    tracking_ref: str = "main",
    subdir: str | None = None,
    conn_id: str | None = None,
    refresh_interval: int | None = None,
    submodules: bool = False,
    sparse_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """A GitDagBundle entry.

    Credentials belong in the git connection ``conn_id`` (HTTPS: access token as the password;
    SSH: ``key_file`` or ``private_key`` in the extra), never in ``repo_url``: the config file is
    readable by everyone who can read ``airflow.cfg``. ``repo_url`` may be left out when the
    connection's host holds it. ``refresh_interval`` defaults to ``[dag_processor] refresh_interval``.
    """
    _check_name(name)
    if not repo_url and not conn_id:
        raise BundleConfigError("give repo_url, or conn_id of a git connection whose host is the repository URL")
    if repo_url and _has_embedded_password(repo_url):
        raise BundleConfigError(
            "repo_url carries a password/token: put it in the password of a git connection and pass conn_id"
        )
    if not isinstance(tracking_ref, str) or not tracking_ref.strip():
        raise BundleConfigError("tracking_ref must be a branch, tag or commit, e.g. 'main'")
    _check_subdir(subdir)
    _check_refresh_interval(refresh_interval)
    kwargs: dict[str, Any] = {"tracking_ref": tracking_ref}
    if repo_url:
        kwargs["repo_url"] = repo_url
    if conn_id:
        kwargs["git_conn_id"] = conn_id
    if subdir:
        kwargs["subdir"] = subdir
    if refresh_interval is not None:
        kwargs["refresh_interval"] = refresh_interval
    if submodules:
        kwargs["submodules"] = True
    if sparse_dirs:
        kwargs["sparse_dirs"] = list(sparse_dirs)
    return {"name": name, "classpath": GIT_BUNDLE, "kwargs": kwargs}


def local_bundle(name: str, path: str | os.PathLike, *, refresh_interval: int | None = None) -> dict[str, Any]:
    """A LocalDagBundle entry: a directory on this machine (not versioned: tasks run what is there now)."""
    _check_name(name)
    if not str(path).strip():
        raise BundleConfigError("path must be the directory holding the DAG files")
    _check_refresh_interval(refresh_interval)
    kwargs: dict[str, Any] = {"path": str(path)}
    if refresh_interval is not None:
        kwargs["refresh_interval"] = refresh_interval
    return {"name": name, "classpath": LOCAL_BUNDLE, "kwargs": kwargs}


# ---------------------------------------------------------------------------------------- config


def configured_entries() -> list:
    """The effective ``[dag_processor] dag_bundle_config_list`` (file, env or default)."""
    from airflow.configuration import conf

    raw = conf.get("dag_processor", "dag_bundle_config_list", fallback="") or "[]"
    return parse_entries(raw, "[dag_processor] dag_bundle_config_list")


def parse_entries(raw: str, where: str) -> list:
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BundleConfigError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise BundleConfigError(f"{where} must be a JSON list of bundle entries, not {type(entries).__name__}")
    return entries


# ---------------------------------------------------------------------------------------- validation


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        open_ended = False
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                open_ended = True
            else:
                params.setdefault(p.name, p)
        if not open_ended:
            break
    return params


def _type_problems(cls: type, kwargs: dict, known: dict[str, inspect.Parameter]) -> list[str]:
    """Check values against the bundle class's own annotations (strict: "5" is not an int)."""
    from pydantic import TypeAdapter, ValidationError

    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            try:
                hints.update(typing.get_type_hints(klass.__init__))
            except Exception:  # noqa: BLE001 - annotations that only resolve for type checkers
                continue
    problems = []
    for key, value in kwargs.items():
        hint = hints.get(key)
        if key not in known or hint is None:
            continue
        try:
            TypeAdapter(hint).validate_python(value, strict=True)
        except ValidationError:
            problems.append(f"kwargs.{key}={value!r} has the wrong type: expected {_hint_name(hint)}")
        except Exception:  # noqa: BLE001,S110 - a hint pydantic cannot check is not the user's problem
            pass
    return problems


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate(entries: list, *, remote: bool = True, timeout: float = GIT_TIMEOUT) -> list[Problem]:
    """Everything wrong with ``entries`` (empty: they look right). ``remote`` also asks git repositories."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        label = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else f"#{index}"
        if label in seen:
            problems.append(Problem(label, "the name is used by an earlier entry too; bundle names must be unique"))
        seen.add(label)
        problems += [Problem(label, msg) for msg in _entry_problems(entry, remote=remote, timeout=timeout)]
    return problems


def _entry_problems(entry: Any, *, remote: bool, timeout: float) -> list[str]:
    if not isinstance(entry, dict):
        return [f"each entry must be a JSON object with name, classpath and kwargs, not {type(entry).__name__}"]
    problems = []
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        problems.append(
            f"unknown key(s) {', '.join(unknown)}: an entry has only {', '.join(ENTRY_KEYS)}"
            " (bundle options go inside kwargs)"
        )
    try:
        _check_name(entry.get("name"))
    except BundleConfigError as e:
        problems.append(str(e))
    if entry.get("team_name") is not None and not _multi_team():
        problems.append("team_name needs [core] multi_team = True; remove it or enable multi-team")
    if "kwargs" not in entry:
        problems.append('kwargs is missing: Airflow requires it, "kwargs": {} when the bundle needs none')
    kwargs = entry.get("kwargs", {})
    if not isinstance(kwargs, dict):
        return [*problems, "kwargs must be a JSON object of the bundle class's arguments"]
    classpath = entry.get("classpath")
    if not isinstance(classpath, str) or not classpath:
        return [*problems, f"classpath is missing: e.g. {GIT_BUNDLE} or {LOCAL_BUNDLE}"]
    cls = _import_bundle_class(classpath)
    if isinstance(cls, str):
        return [*problems, cls]
    problems += _kwargs_problems(cls, kwargs)
    if problems:
        return problems  # no point reaching out to a repository for an entry Airflow would refuse
    if issubclass(cls, _git_bundle_class() or ()):
        problems += _git_problems(kwargs, remote=remote, timeout=timeout)
    elif cls.__name__ == "LocalDagBundle":
        problems += _local_problems(kwargs)
    return problems


def _multi_team() -> bool:
    from airflow.configuration import conf

    return conf.getboolean("core", "multi_team", fallback=False)


def _import_bundle_class(classpath: str) -> type | str:
    from airflow.dag_processing.bundles.base import BaseDagBundle
    from airflow._shared.module_loading import import_string

    try:
        cls = import_string(classpath)
    except ImportError as e:
        hint = " (install apache-airflow-providers-git)" if classpath.startswith("airflow.providers.git.") else ""
        return f"unknown classpath {classpath!r}: {e}{hint}"
    if not (isinstance(cls, type) and issubclass(cls, BaseDagBundle)):
        return f"classpath {classpath!r} is not a dag bundle class (a subclass of BaseDagBundle)"
    return cls


def _git_bundle_class() -> type | None:
    try:
        from airflow.providers.git.bundles.git import GitDagBundle
    except ImportError:
        return None
    return GitDagBundle


def _kwargs_problems(cls: type, kwargs: dict) -> list[str]:
    known = {k: p for k, p in _init_params(cls).items() if k not in MANAGED_KWARGS}
    problems = []
    for key in sorted(set(kwargs) - set(known)):
        if key in MANAGED_KWARGS:
            problems.append(f"kwargs.{key} is set by Airflow itself; remove it from kwargs")
            continue
        close = difflib.get_close_matches(key, known, n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"unknown kwargs.{key} for {cls.__name__}: {suggestion}it accepts {', '.join(sorted(known))}")
    missing = [k for k, p in known.items() if p.default is p.empty and k not in kwargs]
    problems += [f"kwargs.{key} is required by {cls.__name__}" for key in missing]
    problems += _type_problems(cls, kwargs, known)
    return problems


def _local_problems(kwargs: dict) -> list[str]:
    if "path" not in kwargs:
        from airflow import settings

        if not Path(settings.DAGS_FOLDER).is_dir():
            return [f"no kwargs.path, so [core] dags_folder {settings.DAGS_FOLDER!r} is used, and it is not a "
                    "directory here: create it, set kwargs.path, or remove this bundle"]
        return []
    path = Path(os.path.expanduser(kwargs["path"]))
    if not path.is_dir():
        return [f"kwargs.path {str(path)!r} is not a directory here: create it or fix the path"]
    return []


def find_connection(conn_id: str):
    """The connection as an agent sees it: env ``AIRFLOW_CONN_*`` and the configured secrets backend.

    Never the metadata DB (agents have none), so a connection defined only in the plane's DB is
    reported missing here, which is what a task on the agent would find too.
    """
    from airflow.sdk.configuration import ensure_secrets_loaded

    for backend in ensure_secrets_loaded(default_backends=[_ENV_BACKEND]):
        try:
            conn = backend.get_connection(conn_id=conn_id)
        except Exception as e:  # noqa: BLE001 - any backend failure becomes a problem report
            name = type(backend).__name__
            raise BundleConfigError(f"secrets backend {name} failed looking up {conn_id!r}: {e}") from None
        if conn:
            return conn
    return None


def _git_problems(kwargs: dict, *, remote: bool, timeout: float) -> list[str]:
    repo_url = kwargs.get("repo_url")
    conn_id = kwargs.get("git_conn_id")
    problems = []
    if repo_url and _has_embedded_password(repo_url):
        problems.append("repo_url carries a password/token: move it into the password of the git connection")
    _check_or_append(problems, _check_subdir, kwargs.get("subdir"))
    try:
        conn = find_connection(conn_id or "git_default")
    except BundleConfigError as e:
        return [*problems, str(e)]
    if conn is None and conn_id:
        problems.append(
            f"connection {conn_id!r} not found in the environment or the secrets backend (the agent has no "
            f"metadata DB): set AIRFLOW_CONN_{conn_id.upper()} or add it to the secrets backend"
        )
    elif conn is None and not repo_url:
        problems.append("no repo_url and no connection 'git_default': set kwargs.repo_url or kwargs.git_conn_id")
    elif not repo_url and not conn.host:
        problems.append(f"connection {conn.conn_id!r} has no host: put the repository URL there or set repo_url")
    if problems or not remote:
        return problems
    try:
        refs = ls_remote(repo_url, conn, timeout=timeout)
    except BundleConfigError as e:
        return [str(e)]
    ref = kwargs["tracking_ref"]
    if not _ref_exists(ref, refs):
        branches = sorted(r.removeprefix("refs/heads/") for r in refs if r.startswith("refs/heads/"))
        problems.append(
            f"tracking_ref {ref!r} is not a branch or tag of the repository (branches: {', '.join(branches) or 'none'})"
        )
    return problems


def _check_or_append(problems: list[str], fn, *args) -> None:
    try:
        fn(*args)
    except BundleConfigError as e:
        problems.append(str(e))


def _ref_exists(ref: str, refs: dict[str, str]) -> bool:
    if ref in refs or f"refs/heads/{ref}" in refs or f"refs/tags/{ref}" in refs:
        return True
    # A commit id is only checkable by fetching it: left to the fetch (the doctor check does it).
    return bool(_SHA.match(ref))


def _hook(repo_url: str | None, conn):
    """GitHook for ``conn`` (already looked up), so it never asks Airflow's connection chain again."""
    from airflow.providers.git.hooks.git import GitHook

    if conn is None:
        from airflow.sdk import Connection

        conn = Connection(conn_id="git_default", conn_type="git")
    cls = type("_FoundConnectionGitHook", (GitHook,), {"get_connection": classmethod(lambda _cls, _id: conn)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the host-key default warning; the bundle itself will say it again
        return cls(git_conn_id=conn.conn_id, repo_url=repo_url)


_hook_env_lock = threading.Lock()  # GitHook.configure_hook_env sets os.environ for the duration


def ls_remote(repo_url: str | None, conn, *, timeout: float = GIT_TIMEOUT) -> dict[str, str]:
    """``{ref: sha}`` the repository advertises, asked with the connection's credentials."""
    try:
        hook = _hook(repo_url, conn)
    except ValueError as e:
        raise BundleConfigError(f"connection {conn.conn_id!r} is invalid: {e}") from None
    url = hook.repo_url
    where = _redacted(url)
    with _hook_env_lock, hook.configure_hook_env():
        env = {**os.environ, **hook.env, "GIT_TERMINAL_PROMPT": "0"}
        if "GIT_SSH_COMMAND" in env and url and not url.startswith(("http://", "https://")):
            env["GIT_SSH_COMMAND"] += f" -o BatchMode=yes -o ConnectTimeout={int(timeout)}"
        try:
            out = subprocess.run(
                ["git", "ls-remote", "--heads", "--tags", url],
                env=env, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise BundleConfigError(f"repository {where} did not answer within {timeout:.0f}s") from None
        except FileNotFoundError:
            raise BundleConfigError("git is not installed here: GitDagBundle needs the git command") from None
    if out.returncode:
        raise BundleConfigError(_explain_git_error(out.stderr, where, conn))
    refs = {}
    for line in out.stdout.splitlines():
        sha, _, ref = line.partition("\t")
        refs[ref] = sha
    return refs


def _redacted(url: str | None) -> str:
    url = str(url)
    if url.startswith(("http://", "https://")) and "@" in url.partition("://")[2].partition("/")[0]:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.partition('@')[2]}"
    return url


_GIT_CAUSES = ("permission denied", "host key verification failed", "authentication failed",
               "could not read username", "not found", "unable to access", "could not resolve")


def _git_error_line(stderr: str) -> str:
    """The line of git's stderr that says why (not its "make sure you have the correct access rights")."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    cause = [line for line in lines if any(c in line.lower() for c in _GIT_CAUSES)]
    fatal = [line for line in lines if line.startswith("fatal:")]
    return (cause or fatal or lines or ["git failed"])[0]


def _explain_git_error(stderr: str, where: str, conn) -> str:
    last = _git_error_line(stderr)
    text = stderr.lower()
    conn_name = repr(conn.conn_id) if conn is not None else "(none: anonymous)"
    if "could not read username" in text or "authentication failed" in text or " 401" in text or " 403" in text:
        return (
            f"repository {where} refused access with connection {conn_name}: for HTTPS put an access token in the "
            f"connection's password (login: its user name); {last.strip()}"
        )
    if "permission denied (publickey" in text or "host key verification failed" in text:
        return (
            f"repository {where} refused the SSH key of connection {conn_name}: set key_file or private_key in "
            f"its extra (and known_hosts_file / strict_host_key_checking); {last.strip()}"
        )
    if "not found" in text or "does not appear to be a git repository" in text or " 404" in text:
        return f"repository {where} does not exist (check repo_url / the connection's host); {last.strip()}"
    return f"cannot reach repository {where}: {last.strip()}"


# ---------------------------------------------------------------------------------------- fetching


def fetch(entry: dict) -> str:
    """Get the bundle's current files the way a dag processor would; return a one-line summary."""
    from airflow.dag_processing.bundles.base import unpack_bundle_version

    cls = _import_bundle_class(entry["classpath"])
    if isinstance(cls, str):
        raise BundleConfigError(cls)
    bundle = cls(name=entry["name"], version=None, **entry.get("kwargs", {}))
    bundle.initialize()
    if not bundle.path.exists():
        raise BundleConfigError(f"{bundle.path} does not exist after fetching (check subdir / path)")
    version, _ = unpack_bundle_version(bundle.get_current_version(), bundle)
    return f"{entry['name']} @ {version[:12]}" if version else f"{entry['name']} ({bundle.path})"


@check("bundles")
def bundles_check() -> CheckResult:
    """The configured dag bundles are valid, reachable and fetchable from here."""
    try:
        entries = configured_entries()
    except BundleConfigError as e:
        return CheckResult("bundles", False, str(e), hint="fix [dag_processor] dag_bundle_config_list")
    problems = validate(entries)
    if problems:
        return CheckResult(
            "bundles", False, "; ".join(map(str, problems)),
            hint="`airflow remote-execution bundles validate` lists each problem",
        )
    fetched = []
    for entry in entries:
        try:
            fetched.append(fetch(entry))
        except Exception as e:  # noqa: BLE001 - reported per bundle
            return CheckResult("bundles", False, f"{entry['name']}: fetching failed: {e}")
    return CheckResult("bundles", True, ", ".join(fetched) or "no bundles configured")


# ---------------------------------------------------------------------------------------- cleanup


def remove_stale_versions() -> None:
    """Airflow's own stale-version cleanup (``[dag_processor] stale_bundle_cleanup_*``).

    Workers fetch each version a task needs into ``<storage>/<bundle>/versions/<version>`` and
    nothing on an agent removes them: Airflow runs this cleanup only in the dag processor and in
    schedulers with a local executor, neither of which shares an agent's disk.
    """
    from airflow.dag_processing.bundles.base import BundleUsageTrackingManager

    BundleUsageTrackingManager().remove_stale_bundle_versions()


def remove_stale_versions_periodically(stop: threading.Event) -> None:
    """Run :func:`remove_stale_versions` every ``stale_bundle_cleanup_interval`` until ``stop`` (<= 0: never)."""
    from airflow.configuration import conf

    interval = conf.getint("dag_processor", "stale_bundle_cleanup_interval")
    if interval <= 0:
        return
    while not stop.wait(interval):
        try:
            remove_stale_versions()
        except Exception:  # noqa: BLE001 - cleanup must never take the agent down
            log.exception("Removing stale dag bundle versions failed")

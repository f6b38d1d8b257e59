"""Typed access to the ``[remote_execution]`` section (defaults live in provider info)."""

from __future__ import annotations

from pathlib import Path

SECTION = "remote_execution"
API_PREFIX = "/remote_execution"
API_V1 = f"{API_PREFIX}/v1"


def _conf():
    from airflow.configuration import conf

    return conf


def get(key: str) -> str:
    return _conf().get(SECTION, key, fallback="") or ""


def getint(key: str) -> int:
    return _conf().getint(SECTION, key)


def getfloat(key: str) -> float:
    return _conf().getfloat(SECTION, key)


def getboolean(key: str) -> bool:
    return _conf().getboolean(SECTION, key)


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def agent_token() -> str:
    """The agent token from ``token`` or ``token_file``; a clear error if neither is set."""
    token = get("token").strip()
    if token:
        return token
    token_file = get("token_file").strip()
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise SystemExit(f"Cannot read [remote_execution] token_file {path}: {e.strerror}") from None
        if not token:
            raise SystemExit(f"[remote_execution] token_file {path} is empty")
        return token
    raise SystemExit(
        "No agent token: set [remote_execution] token_file (or AIRFLOW__REMOTE_EXECUTION__TOKEN). "
        "Create one on the plane with `airflow remote-execution tokens create`."
    )


def execution_api_url() -> str:
    """Where the Task SDK on the agent reaches the execution API."""
    return get("execution_api_url") or get("api_url").rstrip("/") + "/execution/"

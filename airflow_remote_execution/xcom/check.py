"""Doctor check ``xcom``: the agent can write, read back (checksum verified) and delete an object in xcom_path."""

from __future__ import annotations

import os
import socket
import time

from airflow_remote_execution.agent.checks import CheckResult, check


def _configured_backend() -> str:
    from airflow.configuration import conf

    return conf.get("core", "xcom_backend", fallback="") or ""


@check("xcom")
def xcom_store() -> CheckResult:
    from airflow_remote_execution.xcom.backend import ObjectStorageXComBackend, delete_object, read_object
    from airflow_remote_execution.xcom import store
    from airflow_remote_execution.xcom.store import Coordinates, Settings

    backend = _configured_backend()
    settings = Settings.from_config()
    if not backend.endswith("ObjectStorageXComBackend") or not settings.path:
        return CheckResult("xcom", True, "object-storage XCom backend not configured here", skipped=True)
    probe = Coordinates("_doctor", f"{socket.gethostname()}-{os.getpid()}", "probe", -1, "probe")
    payload = {"probe": "x" * 64, "at": time.time()}
    fmt, pieces = store.encode(payload)
    started = time.monotonic()
    try:
        ref = ObjectStorageXComBackend._store(settings, probe, fmt, b"", pieces)
    except Exception as e:  # noqa: BLE001
        return CheckResult("xcom", False, f"cannot write to {settings.path}: {type(e).__name__}: {e}",
                           hint="check [remote_execution] xcom_path, xcom_conn_id and the connection's credentials")
    try:
        same = read_object(ref) == payload
    except Exception as e:  # noqa: BLE001
        delete_object(ref)
        return CheckResult("xcom", False, f"wrote but cannot read {ref['ref']}: {type(e).__name__}: {e}",
                           hint="the credentials need read access to xcom_path too")
    try:
        delete_object(ref)
    except Exception as e:  # noqa: BLE001
        return CheckResult("xcom", False, f"cannot delete {ref['ref']}: {type(e).__name__}: {e}",
                           hint="the credentials need delete access (reruns and `xcom gc` delete objects)")
    if not same:
        return CheckResult("xcom", False, f"read back a different value from {ref['ref']}")
    ms = (time.monotonic() - started) * 1000
    return CheckResult("xcom", True, f"wrote, read and deleted a probe object in {settings.path} ({ms:.0f} ms)")

"""
Partial uploads of running tasks' logs to the customer's object storage, so the plane's UI can show
a task's log while it runs without ever connecting to the agent (outbound-only).

Airflow's Task SDK uploads a task's log once, when its supervisor finishes, through the provider's
remote-log IO (``S3RemoteLogIO``, ``GCSRemoteLogIO``, ``WasbRemoteLogIO``). That upload *appends* the
local file to the remote object and then empties the local file. The shipper follows the same
contract with the same IO class and the same remote key: every ``[remote_execution]
log_upload_interval`` seconds it appends the complete lines of the local file to the remote object and
leaves only the rest locally. When the task process ends, the shipper lets go of that task, and
Airflow's own final upload appends what is left - the remote object ends up as the whole log, in
order, once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("airflow_remote_execution.agent.logs")


class RemoteLogWriter(Protocol):
    """What the shipper needs of a provider's remote-log IO: where its objects live and an appending write."""

    remote_base: str
    base_log_folder: Path

    def write(self, log: str, remote_log_location: str) -> bool: ...

    def read(self, relative_path: str, ti: object) -> tuple[list[str], list[str] | None]: ...


@dataclass(frozen=True)
class TaskLog:
    """One running task's log: ``relative_path`` is the workload's ``log_path`` (under ``base_log_folder``)."""

    relative_path: str
    active: bool  # False once the task process is gone: Airflow's final upload takes over


class LogShipper:
    """Appends new complete lines of each active task's local log to its remote object, every ``interval`` s."""

    def __init__(
        self,
        io: RemoteLogWriter,
        tasks: Callable[[], Iterable[TaskLog]],
        interval: float,
        stop: threading.Event,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"log upload interval must be > 0 seconds, got {interval}")
        self.io = io
        self.tasks = tasks
        self.interval = interval
        self.stop = stop
        self._thread = threading.Thread(target=self._loop, name="log-shipper", daemon=True)

    def start(self) -> LogShipper:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.ship_once()
            except Exception:  # noqa: BLE001 - a storage hiccup must not end partial uploads for good
                log.exception("Partial log upload failed; retrying in %ss", self.interval)

    def ship_once(self) -> int:
        """One round over the running tasks; returns how many bytes went to remote storage."""
        total = 0
        for task in self.tasks():
            if task.active:  # once the task process ended, the log is Airflow's final upload's
                total += self._ship(task)
        return total

    def remote_location(self, relative_path: str) -> str:
        """The key the provider IO's own ``upload`` uses for this log (so the UI reads the same object)."""
        return os.path.join(self.io.remote_base, relative_path)

    def _ship(self, task: TaskLog) -> int:
        local = Path(self.io.base_log_folder, task.relative_path)
        try:
            data = local.read_bytes()
        except FileNotFoundError:
            return 0  # the supervisor has not created it yet
        complete = data[: data.rfind(b"\n") + 1]  # whole lines only: the UI parses JSON lines
        if not complete:
            return 0
        # Without its last newline: every provider's appending write puts one between old and new text.
        text = complete[:-1].decode("utf-8", errors="replace")
        if not self.io.write(text, self.remote_location(task.relative_path)):
            log.warning("Partial upload of %s failed (the IO logged why); retrying next round", task.relative_path)
            return 0
        self._drop_shipped(local, len(complete))
        return len(complete)

    @staticmethod
    def _drop_shipped(local: Path, shipped: int) -> None:
        """Leave only the not yet uploaded bytes in the local file, as the IO's own ``upload`` does.

        Airflow's final upload appends the whole local file, so uploaded lines must not stay in it. The
        supervisor keeps appending (``O_APPEND``) meanwhile: what it wrote after our read is carried over
        (read, truncate, append back - microseconds apart, where the IO's own upload empties the file a
        whole network round trip after reading it).
        """
        try:
            with open(local, "r+b") as f:
                f.seek(shipped)
                carry = f.read()
                f.truncate(0)
        except FileNotFoundError:
            return
        if carry:
            with open(local, "ab") as f:
                f.write(carry)


def remote_log_io() -> RemoteLogWriter | None:
    """A fresh instance of the remote-log IO the Task SDK resolves from ``[logging]`` (None: no remote logging).

    Fresh, so that its storage client (and connection pool) belongs to the shipper thread only and is
    never shared with the forked supervisors, which build their own.
    """
    import attrs

    from airflow.sdk._shared.logging.factory import resolve_remote_task_log
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.configuration import conf
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    if not conf.getboolean("logging", "remote_logging", fallback=False):
        return None
    io, _ = resolve_remote_task_log(conf=conf, providers_manager=ProvidersManagerTaskRuntime(), import_string=import_string)
    if io is None:
        return None
    if not all(hasattr(io, attr) for attr in ("write", "read", "remote_base", "base_log_folder")):
        log.warning("Remote log IO %s has no appending write(); running tasks' logs show up only at the end",
                    type(io).__name__)
        return None
    return attrs.evolve(io) if attrs.has(type(io)) else io


def _warm_up(io: RemoteLogWriter) -> None:
    """Build the storage client and make one request now, before the agent forks any workload.

    A fork while another thread is importing a module leaves that module's import lock held in the
    child forever: a supervisor that then imports it for its own upload hangs before its task starts.
    """
    try:
        io.read(".airflow-remote-execution-probe", None)  # lists a prefix where nothing lives
    except Exception as e:  # noqa: BLE001 - only a first check; each upload reports its own errors
        log.warning("Cannot list the remote log folder %s yet: %s", io.remote_base, e)


def start_log_shipper(running: Callable[[], list[TaskLog]], stopped: threading.Event) -> LogShipper | None:
    """Upload the logs ``running`` names until ``stopped``, if remote logging is on and ``log_upload_interval`` > 0."""
    from airflow_remote_execution import config

    interval = config.getfloat("log_upload_interval")
    if interval <= 0:
        log.info("Partial log uploads are off ([remote_execution] log_upload_interval = %s)", interval)
        return None
    try:
        io = remote_log_io()
    except Exception as e:  # noqa: BLE001 - bad logging config must not keep the agent from running tasks
        log.warning("Partial log uploads are off: cannot set up remote logging: %s", e)
        return None
    if io is None:
        log.info("Partial log uploads are off: [logging] remote_logging is not on")
        return None
    _warm_up(io)
    log.info("Uploading running tasks' logs to %s every %ss", io.remote_base, interval)
    return LogShipper(io, running, interval, stopped).start()

"""
Task logs to where the plane's UI reads them, while tasks run and when they end, without the plane ever
connecting to the agent (outbound-only). Two ways, by configuration:

* ``[logging] remote_logging`` on: partial uploads to the customer's object storage (:class:`LogShipper`);
* otherwise (and ``[remote_execution] plane_task_logs``, the default): each task's log is sent to the
  plane log store through the Remote Execution API (:class:`PlaneLogSender`); the log text then leaves
  the agent's infrastructure.

Object storage:

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
import time
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
    work_id: int = 0  # the lease it runs under (for the plane log store) ...
    fence: int = 0
    trigger: bool = False  # ... or, for a trigger's log: work_id is the trigger id, fence the triggerer id


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

    def task_ended(self, work_id: int, fence: int) -> None:
        """Nothing to do: Airflow's own final upload appends the rest when the supervisor exits."""

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


class PlaneLogSender:
    """Sends each task's log to the plane log store (``POST /v1/work/{id}/log``): every ``interval`` seconds
    the complete lines written since the last piece (``interval`` 0: none while the task runs), and once
    the task is gone from the running work, the rest. The local file is left as it is (the sent offset is
    kept per lease); the plane keeps each byte once, so a piece whose answer was lost is simply sent again.

    Triggers' logs (``TaskLog.trigger``, ``POST /v1/triggers/{id}/log``) go every :data:`POLL` seconds: the
    plane takes a trigger's log only once it has checked a first piece while the trigger still ran.
    """

    POLL = 0.5  # seconds between looks for tasks that ended (their last lines go at once)

    def __init__(
        self,
        client,
        tasks: Callable[[], Iterable[TaskLog]],
        base_log_folder: Path,
        interval: float,
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.tasks = tasks
        self.base_log_folder = Path(base_log_folder)
        self.interval = interval
        self.stop = stop
        self.sent: dict[tuple[bool, int, int], tuple[str, int]] = {}  # (trigger, id, fence) -> (path, offset)
        # Where the logs of ended leases ended: a task resumed after deferral appends to the same file, and
        # its new lease sends only what follows (the earlier lease sent the rest). Bounded: oldest go first.
        self.ended: dict[str, int] = {}
        self.dropped: set[tuple[bool, int, int]] = set()  # logs the plane takes no more of
        self.refused = False  # the plane keeps no logs (plane_task_logs = False there)
        self._lock = threading.Lock()  # the sender thread and the worker's reapers (task_ended)
        self._thread = threading.Thread(target=self._loop, name="log-sender", daemon=True)

    def start(self) -> PlaneLogSender:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        next_round = time.monotonic() + self.interval
        while not self.stop.wait(self.POLL) and not self.refused:
            partial = self.interval > 0 and time.monotonic() >= next_round
            if partial:
                next_round = time.monotonic() + self.interval
            try:
                self.send_once(partial=partial)
            except Exception:  # noqa: BLE001 - a hiccup must not end log sending for good
                log.exception("Sending task logs to the plane failed; retrying")
        if not self.refused:
            try:
                self.send_once(partial=False, final=True)  # the agent stops: what is left of every log
            except Exception:  # noqa: BLE001
                log.exception("Could not send the rest of the task logs to the plane")

    def task_ended(self, work_id: int, fence: int) -> None:
        """Send the rest of a task's log now, before the worker reports the task's end: the plane then holds
        the whole log when the task shows finished, and a task shorter than :data:`POLL` is not missed."""
        try:
            self.send_once(partial=False, ended=(False, work_id, fence))
        except Exception:  # noqa: BLE001 - the task's outcome must be reported all the same
            log.exception("Could not send the rest of work %s's log to the plane", work_id)

    def send_once(self, partial: bool = True, final: bool = False, ended: tuple | None = None) -> int:
        """Send complete new lines of running tasks (if ``partial``) and the rest of the logs of tasks that
        are gone (all, if ``final``; ``ended``: only that one, which may still be listed); returns how many
        bytes of log files the plane now holds more."""
        with self._lock:
            return self._send_once(partial, final, ended)

    def _send_once(self, partial: bool, final: bool, ended: tuple | None) -> int:
        running = {(t.trigger, t.work_id, t.fence): t for t in self.tasks() if t.work_id}
        self.dropped &= running.keys()
        for key, task in running.items():
            if key not in self.sent and key not in self.dropped:
                self.sent[key] = (task.relative_path, self.ended.pop(task.relative_path, 0))
        total = 0
        for key, (path, offset) in list(self.sent.items()):
            if self.refused:
                break
            if ended is not None and key != ended:
                continue
            if key in running and not final and key != ended:
                if partial or key[0]:
                    total += self._send(key, path, offset, whole=False)
            else:  # the task ended (its supervisor too): all of it, then forget it
                total += self._send(key, path, offset, whole=True)
                if (done := self.sent.pop(key, None)) is not None:
                    self._ended(*done)
        return total

    def _ended(self, path: str, offset: int) -> None:
        self.ended[path] = offset
        while len(self.ended) > 10_000:
            del self.ended[next(iter(self.ended))]

    def _send(self, key: tuple[bool, int, int], path: str, offset: int, whole: bool) -> int:
        from airflow_remote_execution.agent.client import LeaseLost, PlaneError
        from airflow_remote_execution.wire.task_logs import MAX_PIECE, LogPiece, LogPieceResponse

        trigger, work_id, fence = key
        route = f"/triggers/{work_id}/log" if trigger else f"/work/{work_id}/log"
        try:
            with open(self.base_log_folder / path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return 0  # the supervisor has not created it yet
        if not whole:
            data = data[: data.rfind(b"\n") + 1]  # whole lines only while the task writes
        sent = 0
        while data:
            piece = data[:MAX_PIECE]
            if len(data) > MAX_PIECE and (cut := piece.rfind(b"\n")) >= 0:
                piece = piece[: cut + 1]
            body = LogPiece(fence=fence, start=offset, end=offset + len(piece), text=piece.decode("utf-8", "replace"))
            try:
                answer = self.client._post(route, body, LogPieceResponse)
            except LeaseLost as e:  # not this lease's any more, or a gap the plane cannot fill
                log.warning("The plane keeps no more of the log of %s: %s", route, e.detail)
                self.sent.pop(key, None)
                self.dropped.add(key)
                return sent
            except PlaneError as e:
                if e.status == 403:
                    log.warning("Task logs are not sent to the plane any more: %s", e.detail)
                    self.refused = True
                elif e.status in (404, 413, 422):
                    log.warning("The plane refused a piece of the log of %s: %s", route, e.detail)
                    self.sent.pop(key, None)
                    self.dropped.add(key)
                else:
                    log.warning("Could not send the log of %s to the plane (%s); retrying", route, e.detail)
                    if whole:  # keep it to send again next time (and at the agent's stop)
                        self.sent[key] = (path, offset)
                        raise
                return sent
            advanced = max(answer.stored_until, offset + len(piece)) - offset
            sent += advanced
            offset += advanced
            data = data[advanced:]
            self.sent[key] = (path, offset)
            if answer.truncated:
                data = b""
        return sent


def start_trigger_log_sender(client, triggers: Callable[[], Iterable[TaskLog]], stopped: threading.Event):
    """In an agent triggerer: send the logs of the triggers ``triggers`` names to the plane, if the task logs
    go there (no remote logging; with it, Airflow's triggerer uploads them when each trigger ends)."""
    from airflow.sdk.configuration import conf

    from airflow_remote_execution import config

    if conf.getboolean("logging", "remote_logging", fallback=False) or not config.getboolean("plane_task_logs"):
        return None
    folder = Path(conf.get("logging", "base_log_folder"))
    return PlaneLogSender(client, triggers, folder, max(config.getfloat("log_upload_interval"), 0.0), stopped).start()


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


def start_log_shipper(
    running: Callable[[], list[TaskLog]], stopped: threading.Event, client=None
) -> LogShipper | PlaneLogSender | None:
    """Upload the logs ``running`` names until ``stopped``: to object storage if remote logging is on and
    ``log_upload_interval`` > 0; without remote logging, to the plane through ``client`` if ``plane_task_logs``."""
    from airflow.sdk.configuration import conf

    from airflow_remote_execution import config

    interval = config.getfloat("log_upload_interval")
    if not conf.getboolean("logging", "remote_logging", fallback=False):
        if client is None or not config.getboolean("plane_task_logs"):
            log.info("Task logs stay on this agent: no [logging] remote_logging, and plane_task_logs is off")
            return None
        log.info("Sending task logs to the plane's log store (no [logging] remote_logging; every %ss while "
                 "tasks run); [remote_execution] plane_task_logs = False keeps them here", interval)
        folder = Path(conf.get("logging", "base_log_folder"))
        return PlaneLogSender(client, running, folder, max(interval, 0.0), stopped).start()
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

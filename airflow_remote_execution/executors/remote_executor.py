"""
RemoteExecutor: hands workloads to agents through the work-item table.

``queue_workload`` writes the work item in the scheduler's own transaction, so it commits
atomically with the task instance turning QUEUED (and, on PostgreSQL, wakes long-polling agents
through NOTIFY on that same commit). ``sync`` turns agent reports into executor events, requeues
unconfirmed leases and purges old finished items. Imports stay light: the api-server instantiates
executors just to read logs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow import settings
from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor
from airflow.utils.session import create_session

from airflow_remote_execution.plane import agents, leases, metrics

from airflow_remote_execution import config

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from airflow.models.taskinstance import TaskInstance


class RemoteExecutor(BaseExecutor):
    """Runs tasks, callbacks and connection tests on Remote Execution agents, routed by queue."""

    supports_callbacks = True
    supports_connection_test = True
    is_local = False
    serve_logs = False

    _PURGE_EVERY = 60.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_purge = 0.0
        self._lost_agents = agents.LostAgentDetector()
        self._gauges = metrics.GaugeEmitter()  # fleet gauges per queue, every few seconds (docs/metrics.md)

    def start(self) -> None:
        from airflow_remote_execution.plane import exec_guard

        # Deadline callbacks of DAGs agents parse get triggers that only agents' triggerers run.
        exec_guard.park_agents_triggers()
        self.log.info("RemoteExecutor started (parallelism=%s)", self.parallelism)

    # -------------------------------------------------------------- queuing

    def queue_workload(self, workload: workloads.All, session: Session) -> None:
        default_queue = self.conf.get("operators", "default_queue", fallback="default")
        if isinstance(workload, workloads.ExecuteTask):
            kind, queue, weight = "task", workload.ti.queue or default_queue, workload.ti.priority_weight
        elif isinstance(workload, workloads.ExecuteCallback):
            kind, queue, weight = "callback", default_queue, 1_000_000  # callbacks finish existing work first
        elif isinstance(workload, workloads.TestConnection):
            kind, queue, weight = "connection_test", workload.queue or default_queue, 1_000_000
        else:
            raise TypeError(f"RemoteExecutor cannot run workloads of type {type(workload).__name__}")
        bundle_info = getattr(workload, "bundle_info", None)  # tasks and callbacks have a DAG bundle
        leases.enqueue(
            session,
            key=workload.key,
            kind=kind,
            queue=queue,
            priority_weight=weight,
            workload=workload.model_dump_json(),
            bundle=bundle_info.name if bundle_info else None,
        )
        # Counted as running from now on: the scheduler only queues what slots_available allows.
        self.running.add(workload.key)

    def _process_workloads(self, workload_items: Sequence[Any]) -> None:
        """Unused: ``queue_workload`` hands work to agents directly through the table."""

    # -------------------------------------------------------------- state

    def sync(self) -> None:
        with create_session() as session:
            for agent in self._lost_agents.mark_lost(session):
                requeued, failed = leases.reclaim_from_lost(session, agent)
                from airflow_remote_execution.plane import triggers  # rare path: keep the executor's import light

                freed = triggers.release_agent(session, agent.name)
                metrics.agent_lost(agent.name, failed)
                self.log.warning(
                    "Agent %s is lost: %d unstarted workloads requeued, %d running ones failed, %d triggers freed",
                    agent.name, requeued, failed, freed,
                )
            leases.requeue_expired_leases(session)
            for item in leases.pending_reports(session):
                key = leases.key_from_json(item.key)
                if key not in self.running:
                    continue  # another scheduler's work, or already handed back
                state = item.state
                if state == "running":
                    if item.kind != "task":  # tasks report RUNNING themselves via the execution API
                        self.running_state(key, info=item.agent_name)
                elif state == "success":
                    self.success(key, info=item.agent_name)
                else:
                    self.fail(key, info=item.info or item.agent_name)
                leases.mark_reported(session, item, state)
            now = time.monotonic()
            if now - self._last_purge > self._PURGE_EVERY:
                self._last_purge = now
                leases.purge_finished(session, timedelta(seconds=config.getint("finished_retention")))
        self._gauges.maybe_emit()  # after the commit, in its own read: a failing read cannot undo the above

    def revoke_task(self, *, ti: TaskInstance) -> None:
        with _callers_session() as session:
            leases.revoke(session, ti.key)
        self.running.discard(ti.key)
        self.queued_tasks.pop(ti.key, None)

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        """Adopt task instances whose work item is still live (queued, leased or running) or finished with its
        outcome not yet reported (``sync`` reports it); the scheduler resets the others."""
        digests = {leases.key_digest(leases.key_to_json(ti.key)): ti for ti in tis}
        with _callers_session() as session:
            live = leases.adoptable_digests(session, digests)
        for digest in live:
            self.running.add(digests[digest].key)
        return [ti for digest, ti in digests.items() if digest not in live]

    def end(self) -> None:
        self.sync()

    def terminate(self) -> None:
        """Agents keep running their work; a restarted scheduler adopts it."""


@contextlib.contextmanager
def _callers_session():
    """The scheduler calls ``revoke_task`` and ``try_adopt_task_instances`` inside its own scoped session,
    holding ORM objects it uses afterwards: work in that transaction and leave commit and close to it
    (``create_session()`` would return the same session and close it, detaching the caller's objects)."""
    session = settings.Session()
    yield session
    session.flush()

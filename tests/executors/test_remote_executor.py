"""RemoteExecutor against a real metadata DB (Airflow's own engine, our tables); agents act through leases.py."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import TypeAdapter
from sqlalchemy import select

from airflow.executors import workloads
from airflow.executors.workloads.callback import CallbackDTO
from airflow.models.connection_test import ConnectionTestState
from airflow.utils.session import create_session
from airflow.utils.state import CallbackState, TaskInstanceState

from airflow_remote_execution.plane import agents, leases, tokens
from airflow_remote_execution.executors import RemoteExecutor
from airflow_remote_execution.models import AgentModel, WorkItemModel
from airflow_remote_execution.wire.api import RegisterRequest, WorkState

pytestmark = pytest.mark.usefixtures("airflow_db")


def task_workload(task_id: str = "t", *, queue: str = "default", try_number: int = 1, priority: int = 3, map_index: int = -1):
    ti = workloads.TaskInstanceDTO(
        id=uuid.uuid4(),
        task_id=task_id,
        dag_id="remote_dag",
        run_id="manual__2026-01-01T00:00:00+00:00",
        try_number=try_number,
        map_index=map_index,
        dag_version_id=uuid.uuid4(),
        queue=queue,
        pool_slots=1,
        priority_weight=priority,
    )
    return workloads.ExecuteTask(
        ti=ti,
        dag_rel_path="remote_dag.py",
        bundle_info=workloads.BundleInfo(name="dags-folder"),
        log_path=f"dag_id=remote_dag/task_id={task_id}/attempt={try_number}.log",
        token="workload-jwt",
    )


def callback_workload():
    return workloads.ExecuteCallback(
        callback=CallbackDTO(id=uuid.uuid4(), fetch_method="import_path", data={"path": "mod.notify", "kwargs": {}}),
        dag_rel_path="remote_dag.py",
        bundle_info=workloads.BundleInfo(name="dags-folder"),
        log_path="executor_callbacks/remote_dag/run/cb",
        token="cb-jwt",
    )


def connection_test_workload(queue: str | None = "net"):
    return workloads.TestConnection(
        connection_test_id=uuid.uuid4(), connection_id="my_http", timeout=30, queue=queue, token="ct-jwt"
    )


def queue(executor: RemoteExecutor, *items) -> None:
    with create_session() as session:
        for workload in items:
            executor.queue_workload(workload, session)


def row_for(key) -> WorkItemModel | None:
    digest = leases.key_digest(leases.key_to_json(key))
    with create_session() as s:
        return s.scalars(select(WorkItemModel).where(WorkItemModel.key_digest == digest)).one_or_none()


class FakeAgentViaLeases:
    """Stands in for an agent: the same state transitions the API routes make, on the same DB."""

    def __init__(self, name: str = "agent-1", queues=("default", "net", "gpu")):
        with create_session() as s:
            _, token = tokens.create(s, agent_name=name, queues=list(queues))
            self.id = agents.register(s, token, RegisterRequest(concurrency=4)).id
        self.queues = list(queues)

    def lease(self, slots: int = 10, confirm_timeout: float = 30):
        with create_session() as s:
            return [(i.id, i.fence) for i in leases.lease(s, s.get(AgentModel, self.id), self.queues, slots, confirm_timeout)]

    def start(self, work_id: int, fence: int) -> None:
        with create_session() as s:
            leases.confirm_start(s, s.get(AgentModel, self.id), work_id, fence)

    def finish(self, work_id: int, fence: int, outcome: WorkState, info: str | None = None) -> None:
        with create_session() as s:
            leases.finish(s, s.get(AgentModel, self.id), work_id, fence, outcome, info)


@pytest.fixture
def executor():
    ex = RemoteExecutor()
    ex.start()
    return ex


# ------------------------------------------------------------------ queue_workload


def test_queue_task_writes_a_work_item_and_counts_it_running(executor):
    workload = task_workload(queue="gpu", priority=7)
    queue(executor, workload)
    row = row_for(workload.key)
    assert (row.kind, row.queue, row.priority_weight, row.state, row.fence) == ("task", "gpu", 7, "queued", 0)
    assert row.key == ["ti", "remote_dag", "t", "manual__2026-01-01T00:00:00+00:00", -1, 1]
    # The agent gets back exactly the workload the scheduler built (token included: the task needs it).
    back = TypeAdapter(workloads.ExecutorWorkload).validate_json(row.workload)
    assert back == workload and back.token == "workload-jwt"
    assert executor.running == {workload.key}
    assert executor.queued_tasks == {}  # handed over directly, nothing left for trigger_tasks


def test_queue_callback_and_connection_test(executor, monkeypatch):
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "fallback-q")
    callback, with_queue, without_queue = callback_workload(), connection_test_workload("net"), connection_test_workload(None)
    queue(executor, callback, with_queue, without_queue)
    cb_row, ct_row, ct_default_row = row_for(callback.key), row_for(with_queue.key), row_for(without_queue.key)
    assert (cb_row.kind, cb_row.queue, cb_row.priority_weight) == ("callback", "fallback-q", 1_000_000)
    assert cb_row.key == ["callback", callback.callback.id]
    assert (ct_row.kind, ct_row.queue, ct_row.priority_weight) == ("connection_test", "net", 1_000_000)
    assert ct_row.key == ["connection_test", str(with_queue.connection_test_id)]
    assert ct_default_row.queue == "fallback-q"
    assert executor.running == {callback.key, with_queue.key, without_queue.key}
    assert json.loads(cb_row.workload)["type"] == "ExecuteCallback"


def test_callbacks_and_connection_tests_are_leased_before_tasks(executor):
    task, callback, conn_test = task_workload(priority=999_999), callback_workload(), connection_test_workload("default")
    queue(executor, task, callback, conn_test)
    agent = FakeAgentViaLeases(queues=["default"])
    leased = agent.lease(slots=3)
    with create_session() as s:
        kinds = [s.get(WorkItemModel, work_id).kind for work_id, _ in leased]
    assert kinds == ["callback", "connection_test", "task"]


def test_queue_rejects_other_workloads(executor):
    class NotAWorkload:
        key = "x"

    with create_session() as session, pytest.raises(TypeError, match="cannot run workloads of type NotAWorkload"):
        executor.queue_workload(NotAWorkload(), session)
    assert executor.running == set()


def test_queue_same_key_again_fences_out_the_old_lessee(executor):
    workload = task_workload()
    queue(executor, workload)
    agent = FakeAgentViaLeases()
    ((work_id, fence),) = agent.lease()
    queue(executor, workload)
    with pytest.raises(leases.LeaseConflict):
        agent.start(work_id, fence)
    assert row_for(workload.key).state == "queued"


# ------------------------------------------------------------------ sync


def test_sync_reports_success_and_failure(executor):
    ok, bad = task_workload("ok"), task_workload("bad")
    queue(executor, ok, bad)
    agent = FakeAgentViaLeases()
    leased = dict(agent.lease())
    for work_id, fence in leased.items():
        agent.start(work_id, fence)
    executor.sync()
    assert executor.event_buffer == {}  # tasks report RUNNING themselves through the execution API
    assert executor.running == {ok.key, bad.key}

    by_task = {row_for(w.key).id: w for w in (ok, bad)}
    for work_id, fence in leased.items():
        if by_task[work_id] is ok:
            agent.finish(work_id, fence, WorkState.SUCCESS)
        else:
            agent.finish(work_id, fence, WorkState.FAILED, "exit code 1")
    executor.sync()
    assert executor.get_event_buffer() == {
        ok.key: (TaskInstanceState.SUCCESS, "agent-1"),
        bad.key: (TaskInstanceState.FAILED, "exit code 1"),
    }
    assert executor.running == set()
    assert row_for(ok.key).reported_state == "success" and row_for(bad.key).reported_state == "failed"
    executor.sync()
    assert executor.get_event_buffer() == {}  # reported once


def test_sync_reports_running_for_callbacks_and_connection_tests(executor):
    callback, conn_test = callback_workload(), connection_test_workload("net")
    queue(executor, callback, conn_test)
    agent = FakeAgentViaLeases()
    leased = agent.lease()
    for work_id, fence in leased:
        agent.start(work_id, fence)
    executor.sync()
    assert executor.get_event_buffer() == {
        callback.key: (CallbackState.RUNNING, "agent-1"),
        conn_test.key: (ConnectionTestState.RUNNING, "agent-1"),
    }
    assert executor.running == {callback.key, conn_test.key}
    for work_id, fence in leased:
        agent.finish(work_id, fence, WorkState.SUCCESS)
    executor.sync()
    assert executor.get_event_buffer() == {
        callback.key: (CallbackState.SUCCESS, "agent-1"),
        conn_test.key: (ConnectionTestState.SUCCESS, "agent-1"),
    }
    assert executor.running == set()


def test_sync_ignores_work_it_does_not_own(executor):
    workload = task_workload()
    queue(executor, workload)
    other_scheduler = RemoteExecutor()
    agent = FakeAgentViaLeases()
    ((work_id, fence),) = agent.lease()
    agent.start(work_id, fence)
    agent.finish(work_id, fence, WorkState.SUCCESS)
    other_scheduler.sync()
    assert other_scheduler.get_event_buffer() == {}
    assert row_for(workload.key).reported_state is None  # left for its owner
    executor.sync()
    assert executor.get_event_buffer() == {workload.key: (TaskInstanceState.SUCCESS, "agent-1")}


def test_sync_requeues_expired_leases(executor):
    workload = task_workload()
    queue(executor, workload)
    agent = FakeAgentViaLeases()
    ((work_id, fence),) = agent.lease(confirm_timeout=-1)
    executor.sync()
    row = row_for(workload.key)
    assert row.state == "queued" and row.agent_id is None
    with pytest.raises(leases.LeaseConflict):
        agent.start(work_id, fence)
    assert agent.lease() == [(work_id, fence + 1)]
    assert executor.running == {workload.key} and executor.event_buffer == {}


def test_sync_purges_reported_work_after_retention(monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__FINISHED_RETENTION", "0")
    executor = RemoteExecutor()
    first, second = task_workload("first"), task_workload("second")
    queue(executor, first)
    agent = FakeAgentViaLeases()
    ((work_id, fence),) = agent.lease()
    agent.start(work_id, fence)
    agent.finish(work_id, fence, WorkState.SUCCESS)
    executor.sync()
    assert executor.get_event_buffer() == {first.key: (TaskInstanceState.SUCCESS, "agent-1")}
    assert row_for(first.key) is None  # reported, then purged in the same sync

    queue(executor, second)
    ((work_id, fence),) = agent.lease()
    agent.start(work_id, fence)
    agent.finish(work_id, fence, WorkState.SUCCESS)
    executor.sync()
    assert executor.get_event_buffer() == {second.key: (TaskInstanceState.SUCCESS, "agent-1")}
    assert row_for(second.key).reported_state == "success"  # purges run at most once a minute


def test_sync_keeps_finished_work_within_retention(executor):
    workload = task_workload()
    queue(executor, workload)
    agent = FakeAgentViaLeases()
    ((work_id, fence),) = agent.lease()
    agent.start(work_id, fence)
    agent.finish(work_id, fence, WorkState.FAILED, "killed by signal 9")
    executor.end()  # end() flushes the last reports
    assert executor.get_event_buffer() == {workload.key: (TaskInstanceState.FAILED, "killed by signal 9")}
    assert row_for(workload.key).state == "failed"


# ------------------------------------------------------------------ revoke / adopt


def orm_ti(workload: workloads.ExecuteTask):
    """A real (unsaved) TaskInstance with the same key as the workload."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG(workload.ti.dag_id, schedule=None):
        task = EmptyOperator(task_id=workload.ti.task_id)
    ti = TaskInstance(task, dag_version_id=workload.ti.dag_version_id, run_id=workload.ti.run_id, map_index=workload.ti.map_index)
    ti.try_number = workload.ti.try_number
    assert ti.key == workload.key
    return ti


def test_revoke_task(executor):
    running, queued_only, other = task_workload("running"), task_workload("queued"), task_workload("other")
    queue(executor, running, queued_only, other)
    agent = FakeAgentViaLeases()
    leased = dict(agent.lease(slots=1))
    ((work_id, fence),) = leased.items()
    agent.start(work_id, fence)
    assert row_for(running.key).id == work_id

    executor.revoke_task(ti=orm_ti(running))
    executor.revoke_task(ti=orm_ti(queued_only))
    assert executor.running == {other.key}
    assert row_for(running.key).state == "revoked" and row_for(queued_only.key).state == "revoked"
    assert row_for(other.key).state == "queued"
    with create_session() as s:
        assert leases.not_owned(s, s.get(AgentModel, agent.id), [work_id]) == [work_id]  # the agent is told to kill it
    with pytest.raises(leases.LeaseConflict, match="is revoked"):
        agent.finish(work_id, fence, WorkState.SUCCESS)
    executor.sync()
    assert executor.get_event_buffer() == {}


def test_try_adopt_task_instances(executor):
    live_queued, live_running, crashed, reported, unknown = (task_workload(n) for n in ("q", "r", "c", "f", "u"))
    previous_scheduler = RemoteExecutor()
    queue(previous_scheduler, live_queued, live_running, crashed, reported)
    agent = FakeAgentViaLeases()
    leased = dict(agent.lease())
    ids = {row_for(w.key).id: w for w in (live_queued, live_running, crashed, reported)}
    for work_id, fence in leased.items():
        if ids[work_id] is live_queued:
            continue
        agent.start(work_id, fence)
        if ids[work_id] is reported:
            agent.finish(work_id, fence, WorkState.SUCCESS)
    previous_scheduler.sync()  # the previous scheduler is told that one finished, then dies
    # The task process of another dies before the task reports; the agent reports it failed, to nobody.
    agent.finish(row_for(crashed.key).id, leased[row_for(crashed.key).id], WorkState.FAILED, "exit code -9")

    tis = [orm_ti(w) for w in (live_queued, live_running, crashed, reported, unknown)]
    not_adopted = executor.try_adopt_task_instances(tis)
    assert [ti.key for ti in not_adopted] == [reported.key, unknown.key]
    assert executor.running == {live_queued.key, live_running.key, crashed.key}
    # The adopting executor now reports their outcome: the crash fails the try (retries apply), not a reset.
    work_id = row_for(live_running.key).id
    agent.finish(work_id, leased[work_id], WorkState.SUCCESS)
    executor.sync()
    assert executor.get_event_buffer() == {
        live_running.key: (TaskInstanceState.SUCCESS, "agent-1"),
        crashed.key: (TaskInstanceState.FAILED, "exit code -9"),
    }
    assert executor.try_adopt_task_instances([]) == []


def test_revoke_and_adopt_leave_the_schedulers_session_open(executor):
    """The scheduler calls both inside its own scoped session and uses its ORM objects afterwards."""
    from sqlalchemy import inspect

    running, other = task_workload("held"), task_workload("other-held")
    queue(executor, running, other)
    agent = FakeAgentViaLeases()
    with create_session() as session:  # what the scheduler's @provide_session does
        held = session.get(AgentModel, agent.id)
        executor.try_adopt_task_instances([orm_ti(other)])
        executor.revoke_task(ti=orm_ti(running))
        assert not inspect(held).detached and held.id == agent.id and held.state == "active"
        assert session.scalar(select(WorkItemModel.state).where(WorkItemModel.id == row_for(running.key).id)) == "revoked"
    assert row_for(running.key).state == "revoked"  # committed with the scheduler's transaction

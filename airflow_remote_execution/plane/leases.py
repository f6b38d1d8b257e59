"""
The work-item state machine. Every state change of a work item happens here, nowhere else.

The executor (scheduler process) and the API routes (api-server processes) both call these
functions with their own SQLAlchemy session; the agent only speaks HTTP to the routes.

::

    QUEUED --lease--> LEASED --confirm_start--> RUNNING --finish--> SUCCESS | FAILED
      ^                 |  (lease expired, or released by the agent)
      +-----------------+
    any unfinished state --revoke--> REVOKED

Race-freedom: every transition is a conditional ``UPDATE ... WHERE state = <expected>`` that
must hit exactly one row, so two API servers can never lease the same item twice. On PostgreSQL
candidate rows are picked with ``FOR UPDATE SKIP LOCKED`` so concurrent lessees do not collide.
Each lease increments ``fence``; start and finish must present the fence they were leased with.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from airflow.sdk import timezone

from airflow_remote_execution.plane import metrics, wakeup
from airflow_remote_execution.models import AgentModel, WorkItemModel
from airflow_remote_execution.wire.api import WorkState

UNFINISHED = (WorkState.QUEUED.value, WorkState.LEASED.value, WorkState.RUNNING.value)
REPORTABLE = (WorkState.RUNNING.value, WorkState.SUCCESS.value, WorkState.FAILED.value)
LAST_LEASE_PRECISION = timedelta(seconds=5)  # an agent's last_lease_at is written at most this often


class LeaseConflict(Exception):
    """A report that does not match the current lease (wrong agent, stale fence, wrong state)."""


# ---------------------------------------------------------------- workload keys


def key_to_json(key: Any) -> list:
    """Serialize an executor key (TaskInstanceKey, CallbackKey, ConnectionTestKey) to JSON."""
    from airflow.models.taskinstancekey import TaskInstanceKey

    if isinstance(key, TaskInstanceKey):
        return ["ti", key.dag_id, key.task_id, key.run_id, key.map_index, key.try_number]
    kind = "callback" if type(key).__name__ == "CallbackKey" else "connection_test"
    return [kind, str(key.id)]


def key_from_json(data: Sequence) -> Any:
    from airflow.models.callback import CallbackKey
    from airflow.models.connection_test import ConnectionTestKey
    from airflow.models.taskinstancekey import TaskInstanceKey

    kind = data[0]
    if kind == "ti":
        return TaskInstanceKey(
            dag_id=data[1], task_id=data[2], run_id=data[3], map_index=data[4], try_number=data[5]
        )
    if kind == "callback":
        return CallbackKey(id=data[1])
    return ConnectionTestKey(id=data[1])


def key_digest(key_json: list) -> str:
    return hashlib.sha1(json.dumps(key_json, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------- executor side


def enqueue(
    session: Session, *, key: Any, kind: str, queue: str, priority_weight: int, workload: str, bundle: str | None = None
) -> None:
    """Queue a workload (new, or again under the same key). Commits with the caller's transaction.
    ``bundle``: the DAG bundle of a task or callback (see :func:`lease`)."""
    key_json = key_to_json(key)
    digest = key_digest(key_json)
    now = timezone.utcnow()
    existing = session.scalar(
        select(WorkItemModel).where(WorkItemModel.key_digest == digest, WorkItemModel.state.in_(UNFINISHED))
    )
    if existing is not None:
        # The scheduler re-queues a key it still owns: replace the lease, fence the old lessee out.
        existing.state = WorkState.QUEUED.value
        existing.workload = workload
        existing.queue = queue
        existing.bundle = bundle
        existing.priority_weight = priority_weight
        existing.agent_id = None
        existing.agent_name = None
        existing.fence += 1
        existing.queued_at = now
        existing.leased_at = existing.lease_expires_at = existing.started_at = None
        existing.reported_state = None
        existing.report_pending = False
    else:
        session.add(
            WorkItemModel(
                kind=kind,
                key=key_json,
                key_digest=digest,
                dag_id=key_json[1] if key_json[0] == "ti" else None,
                run_id=key_json[3] if key_json[0] == "ti" else None,
                queue=queue,
                bundle=bundle,
                priority_weight=priority_weight,
                workload=workload,
                state=WorkState.QUEUED.value,
                fence=0,
                report_pending=False,
                queued_at=now,
            )
        )
    wakeup.notify(session, queue)


def revoke(session: Session, key: Any) -> int:
    """Take back every unfinished item of ``key``; a running agent is told to kill it."""
    digest = key_digest(key_to_json(key))
    result = session.execute(
        update(WorkItemModel)
        .where(WorkItemModel.key_digest == digest, WorkItemModel.state.in_(UNFINISHED))
        .values(
            state=WorkState.REVOKED.value,
            reported_state=WorkState.REVOKED.value,
            report_pending=False,
            finished_at=timezone.utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def requeue_expired_leases(session: Session) -> int:
    """Leases whose start was never confirmed go back to the queue."""
    now = timezone.utcnow()
    expired = (WorkItemModel.state == WorkState.LEASED.value) & (WorkItemModel.lease_expires_at < now)
    # Read first: this runs every scheduler loop, and on SQLite even an UPDATE that matches
    # nothing takes the database write lock.
    if session.scalar(select(WorkItemModel.id).where(expired).limit(1)) is None:
        return 0
    return _requeue_where(session, expired)


def _requeue_where(session: Session, condition, reason: str = "expired_lease") -> int:
    """Put matching leased items back in the queue and wake the agents serving those queues."""
    rows = session.execute(
        update(WorkItemModel)
        .where(WorkItemModel.state == WorkState.LEASED.value, condition)
        .values(state=WorkState.QUEUED.value, agent_id=None, agent_name=None, leased_at=None, lease_expires_at=None)
        .returning(WorkItemModel.queue)
        .execution_options(synchronize_session=False)
    ).all()
    for queue, n in Counter(r.queue for r in rows).items():
        wakeup.notify(session, queue)
        metrics.count_event(session, "work_requeued", n, queue=queue, reason=reason)
    metrics.requeued([r.queue for r in rows], reason)
    return len(rows)


def reclaim_from_lost(
    session: Session, agent: AgentModel, *, keep: Sequence[int] = (), why: str = "lost (no heartbeat)"
) -> tuple[int, int]:
    """A lost (or restarted) agent's unstarted leases go back to the queue; its running work fails (so
    retries apply), except the items in ``keep`` that it says it still runs.

    Its fence on each item is dead from now on: any later report gets 409, and its next heartbeat
    tells it to kill what it still runs.
    """
    now = timezone.utcnow()
    mine = WorkItemModel.agent_id == agent.id
    if keep:
        mine = mine & WorkItemModel.id.not_in(list(keep))
    lost = why.startswith("lost")
    requeued = _requeue_where(session, mine, "lost_agent" if lost else "agent_restarted")
    failed_queues = session.execute(
        update(WorkItemModel)
        .where(mine, WorkItemModel.state == WorkState.RUNNING.value)
        .values(
            state=WorkState.FAILED.value,
            report_pending=True,
            finished_at=now,
            info=f"agent {agent.name} {why}",
        )
        .returning(WorkItemModel.queue)
        .execution_options(synchronize_session=False)
    ).scalars().all()
    if lost:  # counted cluster-wide with the reclaim (metrics.agent_lost sends the StatsD side)
        metrics.count_event(session, "agent_lost")
        for queue, n in Counter(failed_queues).items():
            metrics.count_event(session, "work_failed_on_lost_agent", n, queue=queue)
    return requeued, len(failed_queues)


def pending_reports(session: Session) -> list[WorkItemModel]:
    """Items whose state changed since the executor last reported it to the scheduler."""
    return list(
        session.scalars(
            select(WorkItemModel).where(WorkItemModel.report_pending.is_(True), WorkItemModel.state.in_(REPORTABLE))
        )
    )


def mark_reported(session: Session, item: WorkItemModel, state: str) -> None:
    session.execute(
        update(WorkItemModel)
        .where(WorkItemModel.id == item.id, WorkItemModel.state == state)
        .values(reported_state=state, report_pending=False)
        .execution_options(synchronize_session=False)
    )


def adoptable_digests(session: Session, digests: Iterable[str]) -> set[str]:
    """Which of these keys a scheduler adopting a dead (or restarted) scheduler's task instances must keep:
    live work (queued, leased, running), and finished work whose outcome no scheduler was told yet (the
    adopter reports it; resetting would run a try that ended, e.g. whose process died, once more outside
    its retries)."""
    digests = list(digests)
    if not digests:
        return set()
    unreported = WorkItemModel.report_pending.is_(True) & WorkItemModel.state.in_(REPORTABLE)
    return set(
        session.scalars(
            select(WorkItemModel.key_digest).where(
                WorkItemModel.key_digest.in_(digests), or_(WorkItemModel.state.in_(UNFINISHED), unreported)
            )
        )
    )


def purge_finished(session: Session, older_than: timedelta) -> int:
    cutoff = timezone.utcnow() - older_than
    finished = [s.value for s in WorkState if s.finished]
    result = session.execute(
        delete(WorkItemModel)
        .where(WorkItemModel.state.in_(finished), WorkItemModel.finished_at < cutoff)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


# ---------------------------------------------------------------- agent side (via the API)


def lease(
    session: Session,
    agent: AgentModel,
    queues: Sequence[str],
    slots: int,
    confirm_timeout: float,
    not_bundles: Sequence[str] = (),
) -> list[WorkItemModel]:
    """Lease up to ``slots`` queued items from ``queues`` to ``agent`` (highest priority first), leaving
    work of ``not_bundles`` (bundles agents parse that the agent's token does not allow), in one
    statement: ``WITH picked AS MATERIALIZED (SELECT id ... LIMIT n FOR UPDATE SKIP LOCKED) UPDATE ...
    FROM picked WHERE id = picked.id RETURNING``. Materialized: PostgreSQL may otherwise evaluate the
    pick once per row it updates, and each evaluation skips the rows updated so far and picks others,
    so more than ``n`` were leased."""
    if slots <= 0 or not queues:
        return []
    pick = (
        select(WorkItemModel.id)
        .where(WorkItemModel.state == WorkState.QUEUED.value, WorkItemModel.queue.in_(list(queues)))
        .order_by(WorkItemModel.priority_weight.desc(), WorkItemModel.id)
        .limit(slots)
    )
    if not_bundles:
        pick = pick.where(or_(WorkItemModel.bundle.is_(None), WorkItemModel.bundle.not_in(list(not_bundles))))
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)  # concurrent leases take other rows, never wait
    picked = pick.cte("picked").prefix_with("MATERIALIZED")
    now = timezone.utcnow()
    leased = session.scalars(
        update(WorkItemModel)
        .where(WorkItemModel.id == picked.c.id, WorkItemModel.state == WorkState.QUEUED.value)
        .values(
            state=WorkState.LEASED.value,
            agent_id=agent.id,
            agent_name=agent.name,
            fence=WorkItemModel.fence + 1,
            leased_at=now,
            lease_expires_at=now + timedelta(seconds=confirm_timeout),
        )
        .returning(WorkItemModel)  # the leased rows themselves: no second query for them
        .execution_options(synchronize_session=False, populate_existing=True)
    ).all()
    metrics.leased(leased, now)
    if leased and (agent.last_lease_at is None or now - agent.last_lease_at > LAST_LEASE_PRECISION):
        agent.last_lease_at = now  # coarse: not one more write per lease
    return sorted(leased, key=lambda item: (-item.priority_weight, item.id))


def _fenced_update(
    session: Session, agent: AgentModel, work_id: int, fence: int, expected: Sequence[str],
    already: Sequence[str] = (), **values,
) -> WorkItemModel:
    """Apply a fenced transition; ``already``: states in which the same report from the same lease is a
    retry whose first answer was lost, answered with the row as it is (so a lost reply loses nothing)."""
    updated = session.execute(
        update(WorkItemModel)
        .where(
            WorkItemModel.id == work_id,
            WorkItemModel.agent_id == agent.id,
            WorkItemModel.fence == fence,
            WorkItemModel.state.in_(list(expected)),
        )
        .values(**values)
        .returning(WorkItemModel)  # the updated row itself: no second query for it
        .execution_options(synchronize_session=False, populate_existing=True)
    ).scalar()
    if updated is not None:
        return updated
    row = session.get(WorkItemModel, work_id, populate_existing=True)
    if row is None:
        raise LookupError(f"No work item {work_id}")
    if row.agent_id != agent.id:
        raise LeaseConflict(f"Work item {work_id} is not leased to agent {agent.name!r}")
    if row.fence != fence:
        raise LeaseConflict(f"Stale fencing token {fence} for work item {work_id}: the current lease is {row.fence}")
    if row.state in already:
        return row
    raise LeaseConflict(f"Work item {work_id} is {row.state}, expected {' or '.join(expected)}")


def confirm_start(session: Session, agent: AgentModel, work_id: int, fence: int) -> WorkItemModel:
    """The agent may start the work only if this succeeds. Confirming again under the same lease (its first
    answer was lost) succeeds too, with the work as it is."""
    return _fenced_update(
        session, agent, work_id, fence, [WorkState.LEASED.value], already=[WorkState.RUNNING.value],
        state=WorkState.RUNNING.value, report_pending=True, started_at=timezone.utcnow(), lease_expires_at=None,
    )


def finish(session: Session, agent: AgentModel, work_id: int, fence: int, outcome: WorkState, info: str | None) -> WorkItemModel:
    if outcome not in (WorkState.SUCCESS, WorkState.FAILED):
        raise ValueError("outcome must be 'success' or 'failed'")
    return _fenced_update(
        session, agent, work_id, fence, [WorkState.RUNNING.value], already=[outcome.value],
        state=outcome.value, report_pending=True, finished_at=timezone.utcnow(), info=info,
    )


def release(session: Session, agent: AgentModel, work_id: int, fence: int) -> WorkItemModel:
    """The agent hands back a lease it will not start (e.g. it is shutting down)."""
    row = _fenced_update(
        session, agent, work_id, fence, [WorkState.LEASED.value],
        state=WorkState.QUEUED.value, agent_id=None, agent_name=None, leased_at=None, lease_expires_at=None,
    )
    wakeup.notify(session, row.queue)
    metrics.count_event(session, "work_requeued", queue=row.queue, reason="released")
    metrics.requeued([row.queue], "released")
    return row


def owned(session: Session, work_ids: Sequence[int]) -> dict[int, int]:
    """Which agent holds each of these items now (leased or running); items no agent holds are left out.
    An agent told it runs an item it no longer holds must kill it (heartbeat answers)."""
    if not work_ids:
        return {}
    held = {}
    ids = sorted(set(work_ids))
    for start in range(0, len(ids), 1000):
        held.update(
            (row.id, row.agent_id) for row in session.execute(
                select(WorkItemModel.id, WorkItemModel.agent_id).where(
                    WorkItemModel.id.in_(ids[start : start + 1000]),
                    WorkItemModel.state.in_([WorkState.LEASED.value, WorkState.RUNNING.value]),
                )
            )
        )
    return held


def not_owned(session: Session, agent: AgentModel, work_ids: Sequence[int]) -> list[int]:
    """Of the items an agent says it runs, those that are no longer its own: it must kill them."""
    held = owned(session, work_ids)
    return [w for w in work_ids if held.get(w) != agent.id]


def running_counts(session: Session) -> dict[int, int]:
    rows = session.execute(
        select(WorkItemModel.agent_id, func.count())
        .where(WorkItemModel.state.in_([WorkState.LEASED.value, WorkState.RUNNING.value]))
        .group_by(WorkItemModel.agent_id)
    )
    return {agent_id: count for agent_id, count in rows if agent_id is not None}

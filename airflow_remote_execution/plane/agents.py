"""Agent registry on the plane: registration, heartbeats and listing. Identity comes from the token."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from airflow.sdk import timezone

from airflow_remote_execution import config

from airflow_remote_execution.plane import leases
from airflow_remote_execution.models import AgentModel, AgentTokenModel
from airflow_remote_execution.wire.api import (
    AgentInfo,
    AgentState,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    SentinelReport,
    SentinelReportResponse,
)


class AgentForbidden(Exception):
    """The token does not allow what the agent asked for (name or queues)."""


class AgentNotRegistered(Exception):
    """The token's agent has not registered yet."""


def register(session: Session, token: AgentTokenModel, req: RegisterRequest) -> AgentModel:
    if req.name is not None and req.name != token.agent_name:
        raise AgentForbidden(
            f"Token {token.id} belongs to agent {token.agent_name!r}, not {req.name!r}: "
            "use that agent's own token"
        )
    allowed = list(token.queues)
    queues = sorted(set(req.queues)) if req.queues else allowed
    outside = sorted(set(queues) - set(allowed))
    if outside:
        raise AgentForbidden(
            f"Queue(s) {', '.join(outside)} are outside token {token.id}'s queues ({', '.join(allowed)}); "
            "create a token with those queues or drop them from [remote_execution] queues"
        )
    now = timezone.utcnow()
    agent = token.agent  # loaded with the token (tokens.verify)
    if agent is None:
        agent = AgentModel(name=token.agent_name, registered_at=now, versions={}, drained=False)
        session.add(agent)
    else:  # a restarted agent may be back before it was found lost: what its predecessor held is gone
        leases.reclaim_from_lost(session, agent, keep=req.running, why="restarted (work of the previous process)")
    agent.state = AgentState.ACTIVE.value
    agent.queues = queues
    agent.concurrency = req.concurrency
    agent.free_slots = req.concurrency
    agent.hostname = req.hostname
    agent.versions = dict(req.versions)
    agent.token_id = token.id
    agent.registered_at = now
    agent.last_heartbeat_at = now
    session.flush()
    return agent


def not_registered(name: str) -> AgentNotRegistered:
    return AgentNotRegistered(f"Agent {name!r} is not registered: POST /agents/register first")


def registered(session: Session, name: str) -> AgentModel:
    """The agent of that name, or :class:`AgentNotRegistered` (it must register first)."""
    agent = session.scalar(select(AgentModel).where(AgentModel.name == name))
    if agent is None:
        raise not_registered(name)
    return agent


def for_token(token: AgentTokenModel) -> AgentModel:
    agent = token.agent  # loaded with the token (tokens.verify)
    if agent is None:
        raise not_registered(token.agent_name)
    return agent


def heartbeat(session: Session, agent: AgentModel, req: HeartbeatRequest) -> HeartbeatResponse:
    """One agent's heartbeat in its own transaction (tests, tools); the API batches them: :func:`record_heartbeats`."""
    [answer] = record_heartbeats(session, [Beat(agent.name, req, timezone.utcnow())])
    if isinstance(answer, Exception):
        raise answer
    return answer


@dataclass(frozen=True)
class Beat:
    """A heartbeat as received: ``req`` None is a mere sign of life (a lease request), answered with nothing."""

    agent_name: str
    req: HeartbeatRequest | None
    received_at: datetime


class _HeartbeatStatements:
    """Built once: a statement built per batch leaves a dozen objects in reference cycles for the garbage
    collector (SQLAlchemy's bound-parameter clones), at hundreds of batches a second."""

    def __init__(self) -> None:
        table = AgentModel.__table__
        at, ids = bindparam("at", type_=table.c.last_heartbeat_at.type), bindparam("ids", expanding=True)
        latest = case(
            (or_(table.c.last_heartbeat_at.is_(None), table.c.last_heartbeat_at < at), at),
            else_=table.c.last_heartbeat_at,
        )
        self.agents = select(
            table.c.id, table.c.name, table.c.state, table.c.drained, table.c.last_heartbeat_at
        ).where(table.c.name.in_(bindparam("names", expanding=True)))
        self.seen = update(table).where(table.c.id.in_(ids)).values(last_heartbeat_at=latest)
        self.beat = update(table).where(table.c.id.in_(ids)).values(
            last_heartbeat_at=latest, free_slots=bindparam("slots"), state=bindparam("state")
        )


_HEARTBEAT_STATEMENTS = _HeartbeatStatements()


def record_heartbeats(session: Session, beats: Sequence[Beat]) -> list[HeartbeatResponse | Exception | None]:
    """Record many agents' heartbeats with a few statements, whatever their number: one read of the agents,
    one of the work they say they run, one bulk update. Answers in the order of ``beats``."""
    names = sorted({b.agent_name for b in beats})
    rows = {r.name: r for r in session.execute(_HEARTBEAT_STATEMENTS.agents, {"names": names})}
    held = leases.owned(session, [w for b in beats if b.req and b.agent_name in rows for w in b.req.running])
    interval = heartbeat_interval(session)
    changes: dict[int, dict] = {}
    answers: list[HeartbeatResponse | Exception | None] = []
    for beat in beats:
        row = rows.get(beat.agent_name)
        if row is None:
            answers.append(
not_registered(beat.agent_name) if beat.req else None
            )
            continue
        change = changes.setdefault(row.id, {"last_heartbeat_at": row.last_heartbeat_at})
        if change["last_heartbeat_at"] is None or beat.received_at > change["last_heartbeat_at"]:
            change["last_heartbeat_at"] = beat.received_at
        req = beat.req
        if req is None:
            answers.append(None)
            continue
        change["free_slots"] = req.free_slots
        if req.offline:
            change["state"] = AgentState.OFFLINE.value
        elif req.draining:
            change["state"] = AgentState.STOPPING.value
        else:
            change["state"] = AgentState.ACTIVE.value  # back from LOST, too
        answers.append(
            HeartbeatResponse(
                heartbeat_interval=interval,
                kill=[w for w in req.running if held.get(w) != row.id],
                drain=row.drained,
            )
        )
    # A batch gathers what arrived within a moment (plane/heartbeats.py): its agents are stamped with the latest
    # arrival, and written with one statement per distinct (free slots, state) - a few, however many agents:
    # an executemany is a round trip per row, each one of a thread waiting for the GIL while the event loop is
    # busy, and statements with a bound value per agent leave thousands of objects for the garbage collector.
    if not changes:
        return answers
    at = max(c["last_heartbeat_at"] for c in changes.values())
    groups: dict[tuple, list[int]] = {}
    for agent_id, c in sorted(changes.items()):  # by primary key: concurrent batches never deadlock
        groups.setdefault((c.get("free_slots"), c.get("state")), []).append(agent_id)
    for (free_slots, state), ids in groups.items():
        if state is None:  # only signs of life (held lease requests)
            session.execute(_HEARTBEAT_STATEMENTS.seen, {"ids": ids, "at": at})
        else:
            session.execute(_HEARTBEAT_STATEMENTS.beat, {"ids": ids, "at": at, "slots": free_slots, "state": state})
    return answers


def heartbeat_interval(session: Session) -> float:
    """The heartbeat interval the plane dictates: ``heartbeat_interval``, lengthened as the fleet grows so
    the fleet sends at most ``max_heartbeat_rate`` heartbeats a second. Lost-agent detection follows it."""
    configured = config.getfloat("heartbeat_interval")
    rate = config.getfloat("max_heartbeat_rate")
    if rate <= 0:
        return configured
    return max(configured, round(_live_agents(session) / rate, 1))


_live_count: tuple[float, int] = (float("-inf"), 0)  # (monotonic time read, count): read every 10 s at most


def _live_agents(session: Session) -> int:
    global _live_count
    read_at, count = _live_count
    if time.monotonic() - read_at > 10:
        count = session.scalar(
            select(func.count()).select_from(AgentModel)
            .where(AgentModel.state.in_([AgentState.ACTIVE.value, AgentState.STOPPING.value]))
        ) or 0
        _live_count = (time.monotonic(), count)
    return count


def accepts_work(agent: AgentModel) -> bool:
    return agent.state == AgentState.ACTIVE.value and not agent.drained


def _by_name(session: Session, name: str) -> AgentModel:
    agent = session.scalar(select(AgentModel).where(AgentModel.name == name))
    if agent is None:
        raise LookupError(f"No agent named {name!r} (see `airflow remote-execution agents list`)")
    return agent


def set_drained(
    session: Session, name: str, drained: bool, reason: str | None = None, by: str | None = None
) -> AgentModel:
    """Drain: the agent finishes what it runs and leases nothing new until resumed; it stays up.
    ``reason`` and ``by`` are kept with it (across restarts) until it is resumed."""
    agent = _by_name(session, name)
    agent.drained = drained
    if drained:
        agent.drain_reason = (reason or "").strip()[:500] or None
        agent.drained_by = (by or "")[:250] or None
        agent.drained_at = timezone.utcnow()
    else:
        agent.drain_reason = agent.drained_by = agent.drained_at = None
    return agent


def remove(session: Session, name: str, force: bool = False) -> None:
    """Forget an agent that is gone. A live one would just register again, so that needs ``force``."""
    agent = _by_name(session, name)
    busy = leases.running_counts(session).get(agent.id, 0)
    if not force and (agent.state in (AgentState.ACTIVE.value, AgentState.STOPPING.value) or busy):
        raise AgentForbidden(
            f"Agent {name!r} is {agent.state} with {busy} workload(s): stop it first (or drain it and wait), "
            "or pass force; revoke its tokens to keep it from coming back"
        )
    session.delete(agent)
    session.flush()


class LostAgentDetector:
    """Declares agents silent for ``lost_agent_threshold`` heartbeat intervals LOST (their work is reclaimed).

    The interval is the one the plane dictates (:func:`heartbeat_interval`: longer for a large fleet), and
    the longest dictated lately: agents learn a shorter one only with their next heartbeat's answer. So the
    detection time is ``lost_agent_threshold x max(heartbeat_interval, live agents / max_heartbeat_rate)``.

    When *no* agent has been heard for two intervals the plane itself (api-server down or stalled,
    network) is the likelier culprit, so nobody is declared lost; and when agents are heard again after
    such a silence (or after this scheduler started), each gets one more window to check in, since
    agents resume at different moments. An API outage or stall must not fail running tasks.
    """

    def __init__(self) -> None:
        self._dictated: deque[tuple[float, float]] = deque()  # (monotonic time, interval) lately dictated
        self.grace_until = timezone.utcnow() + self.window()

    def window(self) -> timedelta:
        """How long an agent may be silent: ``lost_agent_threshold`` of the longest interval dictated lately."""
        longest = max((i for _, i in self._dictated), default=config.getfloat("heartbeat_interval"))
        return timedelta(seconds=longest * config.getint("lost_agent_threshold"))

    def interval(self, session: Session) -> float:
        """The longest heartbeat interval the plane dictated within the last window."""
        now = time.monotonic()
        self._dictated.append((now, heartbeat_interval(session)))
        longest = max(interval for _, interval in self._dictated)
        while now - self._dictated[0][0] > longest * (config.getint("lost_agent_threshold") + 1):
            self._dictated.popleft()
        return longest

    def mark_lost(self, session: Session) -> list[AgentModel]:
        now = timezone.utcnow()
        interval = self.interval(session)
        window = self.window()
        newest = session.scalar(select(func.max(AgentModel.last_heartbeat_at)))
        # No agent heard for two intervals: the plane (api-server stalled or down, network) is the likelier
        # culprit. Nobody is lost now, and every agent gets a full window once they are heard again.
        if newest is None or newest < now - timedelta(seconds=2 * interval):
            self.grace_until = now + window
            return []
        if now < self.grace_until:
            return []
        # Silent for a window *after another agent was heard*: when the plane goes away, agents' last
        # heartbeats differ by up to an interval and must not count as one agent outliving another.
        query = select(AgentModel).where(
            AgentModel.state.in_([AgentState.ACTIVE.value, AgentState.STOPPING.value]),
            AgentModel.last_heartbeat_at < newest - window,
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        lost = list(session.scalars(query))
        for agent in lost:
            agent.state = AgentState.LOST.value
        return lost


def list_agents(session: Session) -> list[AgentInfo]:
    counts = leases.running_counts(session)
    now = timezone.utcnow()
    return [
        AgentInfo(
            id=a.id,
            name=a.name,
            state=a.state,
            drained=a.drained,
            drain_reason=a.drain_reason,
            drained_by=a.drained_by,
            drained_at=a.drained_at,
            queues=list(a.queues),
            concurrency=a.concurrency,
            free_slots=a.free_slots,
            running=counts.get(a.id, 0),
            hostname=a.hostname,
            versions=dict(a.versions or {}),
            registered_at=a.registered_at,
            last_heartbeat_at=a.last_heartbeat_at,
            last_lease_at=a.last_lease_at,
            **sentinel_view(a, now),
        )
        for a in session.scalars(select(AgentModel).order_by(AgentModel.name))
    ]


def record_sentinel(session: Session, agent: AgentModel, report: SentinelReport) -> SentinelReportResponse:
    """Store the sentinel's latest report on its agent's row. It leaves liveness alone: only the
    agent's own heartbeats keep an agent from being counted as lost."""
    now = timezone.utcnow()
    agent.sentinel_status = report.status
    agent.sentinel_report = report.model_dump(mode="json")
    agent.sentinel_at = now
    return SentinelReportResponse(received_at=now)


def sentinel_view(agent: AgentModel, now) -> dict:
    """The sentinel fields of :class:`AgentInfo`; stale once 3 report intervals (+10 s) passed in silence."""
    if agent.sentinel_at is None:
        return {}
    report = agent.sentinel_report or {}
    age = max(0.0, (now - agent.sentinel_at).total_seconds())
    failing = [
        f"{c['name']}: {c.get('detail', '')}"[:300]
        for c in report.get("checks", [])
        if not c.get("ok") and not c.get("skipped")
    ]
    return {
        "sentinel_status": agent.sentinel_status,
        "sentinel_at": agent.sentinel_at,
        "sentinel_age": round(age, 1),
        "sentinel_stale": age > 3 * float(report.get("interval", 15)) + 10,
        "sentinel_failing": failing,
    }

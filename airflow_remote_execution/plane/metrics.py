"""
The plane's metrics: fleet figures per queue computed from the database (gauges, the autoscaling
signal and the Prometheus text), and the events the plane emits where they happen (requeues, lost
agents, fencing conflicts, authentication failures, lease timers, long-polls, heartbeat handling).

Gauges are read, not counted: :func:`snapshot` runs one grouped query over unfinished work and one
over agents, so every scheduler (and every scrape) sees the same figures whatever process changed
them. The RemoteExecutor emits them every :data:`EMIT_EVERY` seconds from its sync loop.

Events of the scheduler and of any api-server (requeues, lost agents, fencing conflicts) are also counted
in ``remote_event_count`` by :func:`count_event`, in the transaction of the event, so the Prometheus text
of whichever api-server is scraped shows cluster totals.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import Session

from airflow.sdk import timezone

from airflow_remote_execution import stats
from airflow_remote_execution.models import AgentModel, WorkItemModel
from airflow_remote_execution.models.tables import EventCountModel
from airflow_remote_execution.wire.api import AgentState, WorkState

EMIT_EVERY = 5.0
log = logging.getLogger(__name__)
MAX_SLOTS_PER_AGENT = 10_000


@dataclass
class QueueFigures:
    """One queue's figures; ``free_slots`` and ``agents`` count live agents serving it (active, not drained)."""

    queued: int = 0
    oldest_queued_age: float = 0.0  # seconds the oldest queued work item has waited
    leased: int = 0
    running: int = 0
    free_slots: int = 0
    agents: int = 0

    @property
    def demand(self) -> int:
        """Work that needs a slot now: queued, leased (starting) and running."""
        return self.queued + self.leased + self.running

    def suggested_agents(self, slots_per_agent: int) -> int:
        """Agents of ``slots_per_agent`` slots that fit the demand; 0 when there is none (scale to zero)."""
        return math.ceil(self.demand / max(1, slots_per_agent))


@dataclass
class AgentFigures:
    """One registered agent's health as the plane knows it: its heartbeats and its sentinel's last report."""

    name: str
    state: str
    drained: bool
    concurrency: int
    free_slots: int
    holding: int  # work items leased or running on it
    heartbeat_age: float | None  # seconds since its last heartbeat
    sentinel_status: str | None = None  # ok | degraded | failing, None: no report (or stale)
    sentinel_checks: dict[str, bool] = field(default_factory=dict)  # name -> ok, skipped ones left out


@dataclass
class Snapshot:
    queues: dict[str, QueueFigures] = field(default_factory=dict)
    agents_by_state: dict[str, int] = field(default_factory=dict)
    agents: list[AgentFigures] = field(default_factory=list)
    events: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (name, queue, reason) -> count
    taken_at: datetime = field(default_factory=timezone.utcnow)


def snapshot(session: Session, queues: Iterable[str] = ()) -> Snapshot:
    """Figures of every queue that has unfinished work or a live agent, plus ``queues`` (shown even when
    empty: a scaler must read 0, not a missing key)."""
    now = timezone.utcnow()
    result = Snapshot(taken_at=now)
    figures = result.queues
    for queue in queues:
        figures.setdefault(queue, QueueFigures())
    rows = session.execute(
        select(WorkItemModel.queue, WorkItemModel.state, func.count(), func.min(WorkItemModel.queued_at))
        .where(WorkItemModel.state.in_([WorkState.QUEUED.value, WorkState.LEASED.value, WorkState.RUNNING.value]))
        .group_by(WorkItemModel.queue, WorkItemModel.state)
    ).all()
    for queue, state, count, oldest in rows:
        q = figures.setdefault(queue, QueueFigures())
        setattr(q, state, count)
        if state == WorkState.QUEUED.value and oldest is not None:
            q.oldest_queued_age = round(max(0.0, (now - oldest).total_seconds()), 3)
    holding = {agent_id: count for agent_id, count in session.execute(
        select(WorkItemModel.agent_id, func.count())
        .where(WorkItemModel.state.in_([WorkState.LEASED.value, WorkState.RUNNING.value]))
        .group_by(WorkItemModel.agent_id)
    )}
    for agent in session.scalars(select(AgentModel).order_by(AgentModel.name)):
        state, drained, agent_queues, free = agent.state, agent.drained, agent.queues, agent.free_slots
        result.agents.append(_agent_figures(agent, holding.get(agent.id, 0), now))
        result.agents_by_state[state] = result.agents_by_state.get(state, 0) + 1
        if state != AgentState.ACTIVE.value or drained:
            continue
        for queue in agent_queues or []:
            q = figures.setdefault(queue, QueueFigures())
            q.agents += 1
            q.free_slots += max(0, free or 0)
    result.events = event_counts(session)
    return result


def _agent_figures(agent: AgentModel, holding: int, now: datetime) -> AgentFigures:
    figures = AgentFigures(
        name=agent.name, state=agent.state, drained=bool(agent.drained), concurrency=agent.concurrency or 0,
        free_slots=max(0, agent.free_slots or 0), holding=holding,
        heartbeat_age=round((now - agent.last_heartbeat_at).total_seconds(), 3) if agent.last_heartbeat_at else None,
    )
    report = agent.sentinel_report or {}
    interval = float(report.get("interval", 15))
    if agent.sentinel_at is not None and (now - agent.sentinel_at).total_seconds() <= 3 * interval + 10:
        figures.sentinel_status = agent.sentinel_status
        figures.sentinel_checks = {
            str(c.get("name")): bool(c.get("ok")) for c in report.get("checks", []) if not c.get("skipped")
        }
    return figures


# ---------------------------------------------------------------- gauges (scheduler loop)

QUEUE_GAUGES = ("queued", "oldest_queued_age", "leased", "running", "free_slots", "agents")


class GaugeEmitter:
    """Emits the fleet gauges at most every :data:`EMIT_EVERY` seconds; a queue that disappears is sent
    once more as zeros, so a dashboard does not keep its last value forever."""

    def __init__(self) -> None:
        self._last = 0.0
        self._queues: set[str] = set()
        self._states: set[str] = set()

    def maybe_emit(self) -> None:
        """Read and send the gauges if :data:`EMIT_EVERY` passed, in a session of their own (a failed read
        never touches the caller's transaction); never raises."""
        now = time.monotonic()
        if now - self._last < EMIT_EVERY:
            return
        self._last = now
        try:
            from airflow.utils.session import create_session

            with create_session() as session:
                snap = snapshot(session, self._queues)
            emit_gauges(snap, self._states)
        except Exception:  # noqa: BLE001 - metrics never stop the scheduler
            log.warning("Could not send the fleet gauges", exc_info=True)
            return
        # A queue with nothing left was just sent as zeros (it was remembered); then it is dropped.
        self._queues = {q for q, f in snap.queues.items() if f.demand or f.agents}
        self._states |= set(snap.agents_by_state)


def emit_gauges(snap: Snapshot, known_states: set[str] | None = None) -> None:
    for queue, figures in snap.queues.items():
        for name in QUEUE_GAUGES:
            stats.gauge(f"queue.{name}", getattr(figures, name), queue=queue)
    states = set(snap.agents_by_state) | (known_states or set()) | {s.value for s in AgentState}
    for state in states:
        stats.gauge("agents", snap.agents_by_state.get(state, 0), state=state)


# ---------------------------------------------------------------- cluster-wide event counters (database)

EVENTS = {  # name in remote_event_count -> (Prometheus counter, its labels, help)
    "work_requeued": ("remote_execution_work_requeued_total", ("queue", "reason"),
                      "Leased work put back in the queue, by queue and reason (cluster total)"),
    "agent_lost": ("remote_execution_agent_lost_total", (), "Agents declared lost (cluster total)"),
    "work_failed_on_lost_agent": ("remote_execution_work_failed_on_lost_agent_total", ("queue",),
                                  "Running work failed because its agent was lost (cluster total)"),
    "lease_conflict": ("remote_execution_lease_conflict_total", ("reason",),
                       "Reports refused with 409, fencing conflicts, by reason (cluster total)"),
}


def count_event(session: Session, name: str, n: int = 1, queue: str = "", reason: str = "") -> None:
    """Add ``n`` to a cluster-wide counter, in the caller's transaction, with one upsert statement (it
    commits or rolls back with the event it counts)."""
    if not n:
        return
    table = EventCountModel.__table__
    values = {"name": name, "queue": queue[:256], "reason": reason[:64], "value": n}
    dialect = session.get_bind().dialect.name
    if dialect == "mysql":
        stmt = mysql.insert(table).values(values)
        stmt = stmt.on_duplicate_key_update(value=table.c.value + stmt.inserted.value)
    else:
        stmt = (postgresql if dialect == "postgresql" else sqlite).insert(table).values(values)
        stmt = stmt.on_conflict_do_update(index_elements=["name", "queue", "reason"],
                                          set_={"value": table.c.value + stmt.excluded.value})
    session.execute(stmt)


def event_counts(session: Session) -> dict[tuple[str, str, str], int]:
    return {(r.name, r.queue, r.reason): int(r.value) for r in session.execute(
        select(EventCountModel.name, EventCountModel.queue, EventCountModel.reason, EventCountModel.value))}


class _LaterCounts:
    """Counts of events whose own transaction rolls back (a refused report: the 409 answer undoes the
    route's session), written by one thread of this process in a transaction of their own, so the
    api-server's event loop never waits on the database for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str, str]] = Counter()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._pid: int | None = None

    def add(self, name: str, queue: str = "", reason: str = "") -> None:
        import os

        with self._lock:
            self._pending[(name, queue, reason)] += 1
            self._idle.clear()
            if self._pid != os.getpid():  # first use in this process (api-server workers fork)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="event-counts", daemon=True).start()
        self._wake.set()

    def _run(self) -> None:
        from airflow_remote_execution.plane.own_connections import own_session

        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, Counter()
            try:
                with own_session() as session:  # a background thread: never waits behind requests' pool
                    for (name, queue, reason), n in pending.items():
                        count_event(session, name, n, queue, reason)
            except Exception:  # noqa: BLE001 - a lost count costs a log line, never a request
                log.warning("Could not count %d plane event(s) in the database", sum(pending.values()), exc_info=True)
            with self._lock:
                if not self._pending:
                    self._idle.set()

    def flush(self, timeout: float = 30) -> bool:
        """Wait until every count added so far is written (tests)."""
        return self._idle.wait(timeout)


later = _LaterCounts()


# ---------------------------------------------------------------- events, where they happen


@stats.never_raises
def leased(items: Sequence[WorkItemModel], now: datetime) -> None:
    """Timer queued -> leased per leased item (``leases.lease``)."""
    for item in items:
        if item.queued_at is not None:
            stats.timing("work.queued_to_leased", (now - item.queued_at).total_seconds(), queue=item.queue)
    _count("leases", len(items))


@stats.never_raises
def confirmed(item: WorkItemModel) -> None:
    """Timer leased -> confirmed (the agent's start confirmation committed)."""
    if item.leased_at is not None and item.started_at is not None:
        stats.timing("work.leased_to_confirmed", (item.started_at - item.leased_at).total_seconds(), queue=item.queue)


@stats.never_raises
def requeued(queues: Iterable[str], reason: str) -> None:
    """Leased work back in the queue: ``expired_lease`` (not confirmed in time), ``lost_agent``,
    ``agent_restarted``."""
    for queue, count in Counter(queues).items():
        stats.incr("work.requeued", count, queue=queue, reason=reason)


@stats.never_raises
def agent_lost(name: str, failed: int) -> None:
    """An agent declared lost (no heartbeat); ``failed``: its running work failed with it."""
    stats.incr("agent.lost", agent=name)
    stats.incr("work.failed_on_lost_agent", failed, agent=name)


_CONFLICTS = (("Stale fencing token", "stale_fence"), ("is not leased to agent", "other_agent"))


@stats.never_raises
def lease_conflict(message: str) -> None:
    """A report refused with 409 (wrong agent, stale fence, wrong state): a fencing conflict."""
    reason = next((r for text, r in _CONFLICTS if text in message), "wrong_state")
    stats.incr("lease.conflict", reason=reason)
    later.add("lease_conflict", reason=reason)


_AUTH_REASONS = (
    ("Missing", "missing"), ("Malformed", "malformed"), ("Invalid", "unknown"), ("was revoked", "revoked"),
    ("expired", "expired"), ("not a metrics", "wrong_kind"),
)


@stats.never_raises
def auth_failed(message: str, throttled: bool = False) -> str:
    """A refused token, by reason (missing, malformed, unknown, revoked, expired, wrong_kind, throttled)."""
    reason = "throttled" if throttled else next((r for text, r in _AUTH_REASONS if text in message), "other")
    stats.incr("auth.failed", reason=reason)
    _count(f"auth|{reason}")
    return reason


@stats.never_raises
def long_polls(open_now: int) -> None:
    """Lease requests waiting in this api-server process."""
    stats.gauge("lease.long_polls", open_now)
    with _counter_lock:
        _process["long_polls"] = open_now


class timed:
    """``with metrics.timed("heartbeat"):`` -- a timer ``remote_execution.<what>.duration``."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> timed:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        stats.timing(f"{self.what}.duration", time.perf_counter() - self.start)


# ---------------------------------------------------------------- this process's counters (Prometheus)

_counter_lock = threading.Lock()
_process: Counter[str] = Counter()


def _count(key: str, n: int = 1) -> None:
    if n:
        with _counter_lock:
            _process[key] += n


def process_counters() -> dict[str, int]:
    with _counter_lock:
        return dict(_process)


# ---------------------------------------------------------------- autoscaling and Prometheus views


def scaling_view(snap: Snapshot, slots_per_agent: int, queues: Sequence[str] = ()) -> dict:
    """The JSON KEDA's ``metrics-api`` scaler reads (``valueLocation: total.suggested_agents`` or
    ``queues.<queue>.suggested_agents``). ``queues``: the worker group's queues (``total`` sums them);
    none: every queue."""
    chosen = list(queues) or sorted(snap.queues)
    per_queue = {}
    total = QueueFigures()
    for queue in chosen:
        f = snap.queues.get(queue, QueueFigures())
        per_queue[queue] = {**asdict(f), "suggested_agents": f.suggested_agents(slots_per_agent)}
        for name in ("queued", "leased", "running", "free_slots"):
            setattr(total, name, getattr(total, name) + getattr(f, name))
        total.oldest_queued_age = max(total.oldest_queued_age, f.oldest_queued_age)
        total.agents = max(total.agents, f.agents)  # an agent serving two queues is one agent
    return {
        "slots_per_agent": slots_per_agent,
        "queues": per_queue,
        "total": {**asdict(total), "suggested_agents": total.suggested_agents(slots_per_agent)},
        "agents": dict(sorted(snap.agents_by_state.items())),
        "taken_at": snap.taken_at.isoformat(),
    }


_HELP = {
    "queued": ("gauge", "Work items queued for the queue"),
    "oldest_queued_age": ("gauge", "Seconds the oldest queued work item of the queue has waited"),
    "leased": ("gauge", "Work items leased to an agent, start not yet confirmed"),
    "running": ("gauge", "Work items running on agents"),
    "free_slots": ("gauge", "Free slots across the live agents serving the queue"),
    "agents": ("gauge", "Live agents (active, not drained) serving the queue"),
    "suggested_agents": ("gauge", "Agents of slots_per_agent slots the queue's demand needs"),
}
_LABEL_ESCAPE = re.compile(r'[\\"\n]')


def _label(value: str) -> str:
    return _LABEL_ESCAPE.sub(lambda m: {"\\": "\\\\", '"': '\\"', "\n": "\\n"}[m.group()], value)


def prometheus_text(snap: Snapshot, slots_per_agent: int) -> str:
    """The fleet gauges, the cluster-wide event counters, and this api-server process's own counters
    (leases, authentication failures, long-polls) in Prometheus' text format 0.0.4."""
    lines: list[str] = []
    for name, (kind, help_text) in _HELP.items():
        metric = f"remote_execution_queue_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        for queue, f in sorted(snap.queues.items()):
            value = f.suggested_agents(slots_per_agent) if name == "suggested_agents" else getattr(f, name)
            lines.append(f'{metric}{{queue="{_label(queue)}"}} {value}')
    lines += ["# HELP remote_execution_agents Registered agents by state", "# TYPE remote_execution_agents gauge"]
    for state in sorted(set(snap.agents_by_state) | {s.value for s in AgentState}):
        lines.append(f'remote_execution_agents{{state="{state}"}} {snap.agents_by_state.get(state, 0)}')
    lines += _agent_lines(snap.agents)
    lines += _event_lines(snap.events)
    counters = process_counters()
    families: dict[str, list[str]] = {}
    for key, value in sorted(counters.items()):
        kind, *labels = key.split("|")
        if kind == "auth":
            families.setdefault("auth_failed", []).append(
                f'remote_execution_auth_failed_total{{reason="{labels[0]}"}} {value}')
        elif kind == "leases":
            families.setdefault(kind, []).append(f"remote_execution_{kind}_total {value}")
    for family, samples in families.items():
        lines += [f"# HELP remote_execution_{family}_total Events seen by this api-server process",
                  f"# TYPE remote_execution_{family}_total counter", *samples]
    lines += ["# HELP remote_execution_lease_long_polls Lease requests waiting in this api-server process",
              "# TYPE remote_execution_lease_long_polls gauge",
              f"remote_execution_lease_long_polls {counters.get('long_polls', 0)}"]
    text = "\n".join(lines) + "\n"
    own = stats.prometheus_if_on()  # this process's timers (histograms), recorded by stats.py
    return text + own.text().decode() if own is not None else text


def _event_lines(events: dict[tuple[str, str, str], int]) -> list[str]:
    """The cluster-wide counters: every family is declared; one without labels always has its sample (0
    before the first event), one with labels has a sample per queue and reason seen."""
    lines: list[str] = []
    for name, (metric, labels, help_text) in EVENTS.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        samples = sorted((k, v) for k, v in events.items() if k[0] == name)
        if not labels:
            lines.append(f"{metric} {sum(v for _, v in samples)}")
            continue
        for (_, queue, reason), value in samples:
            given = {"queue": queue, "reason": reason}
            text = ",".join(f'{label}="{_label(given[label])}"' for label in labels)
            lines.append(f"{metric}{{{text}}} {value}")
    return lines


_SENTINEL_STATUS = {"ok": 0, "degraded": 1, "failing": 2}


def _agent_lines(agents: list[AgentFigures]) -> list[str]:
    """Per-agent health from the plane's records: slots (as its last heartbeat said), heartbeat age, and its
    sentinel's last report (fresh ones only)."""
    families = {
        "remote_execution_agent_up": ("1 for each registered agent, labelled with its state", []),
        "remote_execution_agent_slots_used": ("Slots busy, as the agent's last heartbeat said", []),
        "remote_execution_agent_slots_free": ("Slots free, as the agent's last heartbeat said", []),
        "remote_execution_agent_work_held": ("Work items leased or running on the agent", []),
        "remote_execution_agent_heartbeat_age_seconds": ("Seconds since the agent's last heartbeat", []),
        "remote_execution_sentinel_status": ("The sentinel's last fresh report: 0 ok, 1 degraded, 2 failing", []),
        "remote_execution_sentinel_check": ("Each check of the sentinel's last fresh report: 1 ok, 0 failing", []),
    }
    for a in agents:
        agent = f'agent="{_label(a.name)}"'
        families["remote_execution_agent_up"][1].append(
            f'remote_execution_agent_up{{{agent},state="{a.state}",drained="{str(a.drained).lower()}"}} 1')
        families["remote_execution_agent_slots_used"][1].append(
            f"remote_execution_agent_slots_used{{{agent}}} {max(0, a.concurrency - a.free_slots)}")
        families["remote_execution_agent_slots_free"][1].append(f"remote_execution_agent_slots_free{{{agent}}} {a.free_slots}")
        families["remote_execution_agent_work_held"][1].append(f"remote_execution_agent_work_held{{{agent}}} {a.holding}")
        if a.heartbeat_age is not None:
            families["remote_execution_agent_heartbeat_age_seconds"][1].append(
                f"remote_execution_agent_heartbeat_age_seconds{{{agent}}} {a.heartbeat_age}")
        if a.sentinel_status is not None:
            families["remote_execution_sentinel_status"][1].append(
                f"remote_execution_sentinel_status{{{agent}}} {_SENTINEL_STATUS.get(a.sentinel_status, 2)}")
        for check, ok in sorted(a.sentinel_checks.items()):
            families["remote_execution_sentinel_check"][1].append(
                f'remote_execution_sentinel_check{{{agent},check="{_label(check)}"}} {int(ok)}')
    lines: list[str] = []
    for name, (help_text, samples) in families.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *samples]
    return lines

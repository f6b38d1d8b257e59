"""
Fleet figures for autoscalers and Prometheus, read with a metrics token (``metrics-tokens create``):

* ``GET /metrics/scaling?slots_per_agent=4&queues=a,b``: per queue and in total, queued work and the age
  of the oldest, leased, running, free slots, agents, and the suggested agent count, in the JSON shape
  KEDA's ``metrics-api`` scaler reads (``valueLocation: total.suggested_agents``);
* ``GET /metrics/prometheus``: the same gauges in Prometheus' text format, the cluster-wide event counters
  (requeues, lost agents, fencing conflicts: the same from every api-server), and the answering process's own
  counters (leases, authentication failures, long-polls).

Not under ``/v1/``: agents' admission (agent tokens) does not apply, and an agent token is refused here.
GET routes have no body; the token is checked from the header alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from airflow.utils.session import create_session

from airflow_remote_execution import config, stats
from airflow_remote_execution.plane import metrics, metrics_tokens
from airflow_remote_execution.plane.metrics import MAX_SLOTS_PER_AGENT
from airflow_remote_execution.plane.tokens import TokenError
from airflow_remote_execution.wire.api import Problem

# This api-server's timers (queued -> leased, leased -> confirmed, heartbeat handling) as histograms in its
# Prometheus text, per process like its other own counters; counters and gauges come from the database.
stats.prometheus(frozenset({"timing"}))

scaling_router = APIRouter(
    tags=["Metrics"],
    responses={401: {"model": Problem, "description": "Metrics token missing, malformed, unknown, expired or revoked"}},
)
Authorization = Annotated[str | None, Header(description="Bearer <metrics token> (`metrics-tokens create`)")]
SlotsPerAgent = Annotated[
    int, Query(ge=1, le=MAX_SLOTS_PER_AGENT, description="Slots of one agent of the group (its concurrency)")
]
Queues = Annotated[
    str | None, Query(max_length=4000, description="Comma-separated queues of the worker group (default: all)")
]
MAX_QUEUES = 100


def _queues(text: str | None) -> list[str]:
    names = sorted({q.strip() for q in (text or "").split(",") if q.strip()})
    if len(names) > MAX_QUEUES or any(len(q) > 256 for q in names):
        raise ValueError(f"queues: at most {MAX_QUEUES} names of at most 256 characters each")
    return names


SNAPSHOT_TTL = 2.0  # seconds a snapshot serves further reads: many worker groups' KEDA polls cost one
_cache_lock = threading.Lock()
_cache: tuple[float, metrics.Snapshot] | None = None


class _Throttle:
    """As for agents' routes: an address with ``auth_failure_limit`` failed tokens within a minute is answered
    429 without a database read until the minute has passed (per api-server process)."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> int:
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(client)
            while failures and now - failures[0] > self.WINDOW:
                failures.popleft()
            if not failures or len(failures) < config.getint("auth_failure_limit"):
                return 0
            return max(int(self.WINDOW - (now - failures[0])) + 1, 1)

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 100_000:
                self._failures.clear()
            self._failures.setdefault(client, deque()).append(time.monotonic())


_throttle = _Throttle()


def _read(authorization: str | None, client: str) -> metrics.Snapshot:
    """The token checked on every read; the figures (one snapshot of every queue) shared for SNAPSHOT_TTL."""
    global _cache
    if retry_after := _throttle.retry_after(client):
        metrics.auth_failed("", throttled=True)
        raise HTTPException(429, f"Too many failed authentications from {client}: retry after {retry_after} s "
                                 "with a valid metrics token", headers={"Retry-After": str(retry_after)})
    with create_session() as session:
        try:
            metrics_tokens.verify(session, authorization)
        except TokenError as e:
            metrics.auth_failed(str(e))
            _throttle.failed(client)
            raise
        with _cache_lock:
            if _cache is None or time.monotonic() - _cache[0] > SNAPSHOT_TTL:
                _cache = (time.monotonic(), metrics.snapshot(session))
            return _cache[1]


@scaling_router.get("/scaling")
async def scaling(
    request: Request, slots_per_agent: SlotsPerAgent = 1, queues: Queues = None, authorization: Authorization = None
) -> dict:
    """Per queue and in total: the figures and ``suggested_agents`` = ceil((queued + leased + running) /
    ``slots_per_agent``), 0 when there is no work (scale to zero)."""
    names = _queues(queues)
    snap = await run_in_threadpool(_read, authorization, _client(request))
    return metrics.scaling_view(snap, slots_per_agent, names)


@scaling_router.get("/prometheus", response_class=PlainTextResponse)
async def prometheus(
    request: Request, slots_per_agent: SlotsPerAgent = 1, authorization: Authorization = None
) -> PlainTextResponse:
    """The fleet gauges in Prometheus' text exposition format (0.0.4)."""
    snap = await run_in_threadpool(_read, authorization, _client(request))
    return PlainTextResponse(
        metrics.prometheus_text(snap, slots_per_agent), media_type=stats.PROMETHEUS_CONTENT_TYPE
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"

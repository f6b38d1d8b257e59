"""
Emit metrics through Airflow's own facade (``airflow.sdk.observability.stats``), so ``[metrics]``
StatsD, Datadog and OpenTelemetry settings apply unchanged. Plane and agent both emit through here.

Every name starts with ``remote_execution.`` and carries its variables (queue, agent, reason, ...) as
tags, as Airflow 3 names do. Plain StatsD has no tags, so with ``[metrics] legacy_names_on`` (Airflow's
default) each metric is also sent once under its legacy-style name with the tag values appended
(``remote_execution.queue.queued.<queue>``), as Airflow does for pools. docs/metrics.md lists them all.

Nothing here may fail the caller: a broken metrics backend costs a log line, never a lease.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)
PREFIX = "remote_execution."
_MAX_TAG = 100  # a queue or agent name is at most 250 characters; StatsD names stay under 250
_lock = threading.Lock()
_ready_pid: int | None = None
_legacy = True
_off = False  # no [metrics] backend configured: names are not even built


def _stats():
    """The SDK's stats module, initialized from ``[metrics]`` once per process unless something already did
    (the Task SDK and its serde do; the scheduler and the api-server initialize only core's own copy). Not
    initialized twice: with OpenTelemetry that would be a second meter provider exporting beside the first."""
    global _ready_pid, _legacy, _off
    import os

    from airflow.sdk.observability import stats

    if _ready_pid != os.getpid():
        with _lock:
            if _ready_pid != os.getpid():
                from airflow.sdk._shared.observability.metrics import stats as singleton
                from airflow.sdk._shared.observability.metrics.base_stats_logger import NoStatsLogger
                from airflow.sdk.configuration import conf
                from airflow.sdk.observability.metrics import stats_utils

                _legacy = conf.getboolean("metrics", "legacy_names_on", fallback=True)
                if getattr(singleton, "_factory", None) is None:
                    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=_legacy)
                _off = getattr(singleton, "_factory", None) is NoStatsLogger
                _ready_pid = os.getpid()
    return stats


def reset() -> None:
    """Read ``[metrics]`` again at the next metric (tests change it within one process)."""
    global _ready_pid
    from airflow.sdk._shared.observability.metrics import stats as singleton

    singleton._factory = None
    singleton._backend = None
    _ready_pid = None


def tag(value: object) -> str:
    """A tag value safe in a StatsD name: only ``[A-Za-z0-9_.-]``, at most 100 characters."""
    from airflow.sdk.observability.stats import normalize_name_for_stats

    return normalize_name_for_stats(str(value), log_warning=False)[:_MAX_TAG] or "_"


def _names(name: str, tags: dict[str, object]) -> tuple[str, dict[str, str], str | None]:
    clean = {k: tag(v) for k, v in tags.items()}
    legacy = f"{PREFIX}{name}." + ".".join(v.replace(".", "__") for v in clean.values()) if clean and _legacy else None
    return PREFIX + name, clean, legacy


def _emit(kind: str, name: str, value, tags: dict[str, object]) -> None:
    try:
        stats = _stats()
        if _off:
            return
        full, clean, legacy = _names(name, tags)
        for stat, stat_tags in ((full, clean), (legacy, {})):
            if stat is None:
                continue
            if kind == "incr":
                stats.incr(stat, count=value, tags=stat_tags or None)
            elif kind == "gauge":
                stats.gauge(stat, value, tags=stat_tags or None)
            else:
                stats.timing(stat, value, tags=stat_tags or None)
    except Exception:  # noqa: BLE001 - metrics must never break the work they measure
        log.debug("Could not emit metric %s", name, exc_info=True)


def never_raises(fn: F) -> F:
    """For the hooks in leases, routes and the worker: whatever goes wrong in a metric is logged, never
    raised into the transition or request it measures."""

    @functools.wraps(fn)
    def safe(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            log.debug("Metric hook %s failed", fn.__name__, exc_info=True)
            return None

    return safe  # type: ignore[return-value]


def incr(name: str, count: int = 1, **tags: object) -> None:
    if count:
        _emit("incr", name, count, tags)


def gauge(name: str, value: float, **tags: object) -> None:
    _emit("gauge", name, value, tags)


def timing(name: str, seconds: float, **tags: object) -> None:
    """A duration in seconds, sent as a timer (milliseconds in StatsD)."""
    _emit("timing", name, timedelta(seconds=max(0.0, seconds)), tags)

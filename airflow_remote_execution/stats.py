"""
Emit metrics through Airflow's own facade (``airflow.sdk.observability.stats``), so ``[metrics]``
StatsD, Datadog and OpenTelemetry settings apply unchanged. Plane and agent both emit through here.

Every name starts with ``remote_execution.`` and carries its variables (queue, agent, reason, ...) as
tags, as Airflow 3 names do. Plain StatsD has no tags, so with ``[metrics] legacy_names_on`` (Airflow's
default) each metric is also sent once under its legacy-style name with the tag values appended
(``remote_execution.queue.queued.<queue>``), as Airflow does for pools. docs/metrics.md lists them all.

With :func:`serve_prometheus` (the agent's ``agent_metrics_port``), every metric of this process also
updates a process-local ``prometheus_client`` registry served as Prometheus text on ``/metrics``:
``remote_execution_<name, dots as _>`` with the tags as labels; counters end in ``_total``, timers are
histograms in seconds (``_seconds``). This is a pod's own endpoint for the customer's Prometheus; the
plane never connects to it.

Nothing here may fail the caller: a broken metrics backend costs a log line, never a lease.
"""

from __future__ import annotations

import functools
import logging
import os
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
_prom: PrometheusRegistry | None = None  # set by serve_prometheus: this process's /metrics


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
    if _prom is not None:
        _prom.record(kind, name, value, tags)
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


# ---------------------------------------------------------------- Prometheus text of this process

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # every Prometheus text we serve
# Seconds: lease->start and plane backoff run from milliseconds to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
MAX_SERIES = 2_000  # label sets per metric: tag values come from queue and agent names, bounded anyway


class PrometheusRegistry:
    """The metrics of this process as ``prometheus_client`` families, created at their first use."""

    def __init__(self, kinds: frozenset[str] = frozenset({"incr", "gauge", "timing"})) -> None:
        from prometheus_client import CollectorRegistry

        self.kinds = kinds  # what this process records (the api-server: only its timers)
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def metric_name(name: str) -> str:
        return (PREFIX + name).replace(".", "_").replace("-", "_")

    def _family(self, kind: str, name: str, labels: tuple[str, ...]):
        from prometheus_client import Counter, Gauge, Histogram

        with self._lock:
            family = self._families.get((kind, name))
            if family is None:
                base = self.metric_name(name)
                doc = f"{PREFIX}{name} (docs/metrics.md)"
                if kind == "incr":
                    family = Counter(base, doc, labels, registry=self.registry)
                elif kind == "gauge":
                    family = Gauge(base, doc, labels, registry=self.registry)
                else:
                    family = Histogram(f"{base}_seconds", doc, labels, registry=self.registry, buckets=BUCKETS)
                self._families[(kind, name)] = family
            return family

    def record(self, kind: str, name: str, value, tags: dict[str, object]) -> None:
        """Never raises (a metric whose labels changed between calls is logged and skipped)."""
        if kind not in self.kinds:
            return
        try:
            family = self._family(kind, name, tuple(tags))
            if tags:
                if len(family._metrics) >= MAX_SERIES and tuple(tag(v) for v in tags.values()) not in family._metrics:
                    return
                family = family.labels(*(tag(v) for v in tags.values()))
            if kind == "incr":
                family.inc(value)
            elif kind == "gauge":
                family.set(value)
            else:
                family.observe(value.total_seconds() if isinstance(value, timedelta) else float(value))
        except Exception:  # noqa: BLE001
            log.debug("Could not record metric %s for Prometheus", name, exc_info=True)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def prometheus(kinds: frozenset[str] | None = None) -> PrometheusRegistry:
    """This process's registry (made on first use, recording ``kinds``: all by default): metrics are
    recorded in it from then on."""
    global _prom
    with _lock:
        if _prom is None:
            _prom = PrometheusRegistry(kinds) if kinds else PrometheusRegistry()
        return _prom


def prometheus_if_on() -> PrometheusRegistry | None:
    return _prom


def serve_prometheus(host: str, port: int) -> tuple[str, int]:
    """Serve this process's metrics as Prometheus text on ``http://host:port/metrics`` (a daemon thread);
    returns the bound address (``port`` 0: any free port)."""
    from prometheus_client import start_http_server

    registry = prometheus()
    server, _thread = start_http_server(port, addr=host, registry=registry.registry)
    # Processes forked from here (the worker's runners, tasks) do not serve it: without this they kept the
    # port bound after the worker died, until the last of them ended.
    os.register_at_fork(after_in_child=server.socket.close)
    return server.server_address[:2]

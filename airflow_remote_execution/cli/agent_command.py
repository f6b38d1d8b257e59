"""``airflow remote-execution agent start``: runs on the customer side, needs no metadata DB.

``--components`` (or ``[remote_execution] components``) picks what runs; :data:`COMPONENTS` maps each
name to a callable that runs it until SIGTERM and returns an exit code. One component runs in this
process; several run each in a child process of their own, supervised by :func:`run_components`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable

from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution import config

log = logging.getLogger("airflow_remote_execution.agent")


def _run_worker(args) -> int:
    from airflow_remote_execution.agent import metrics
    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.agent.worker import AgentWorker

    metrics.serve_from_config()  # the worker's own /metrics for Prometheus, if agent_metrics_port is set
    worker = AgentWorker(
        PlaneClient.from_config(),
        concurrency=getattr(args, "concurrency", None) or config.getint("concurrency"),
        queues=config.split_list(getattr(args, "queues", None) or config.get("queues")),
        execution_api_url=config.execution_api_url(),
        shutdown_timeout=config.getint("shutdown_timeout"),
    )
    return worker.run()


def _run_dag_processor(_args) -> int:
    from airflow_remote_execution.agent.dag_processor import run_dag_processor

    return run_dag_processor()


def _run_triggerer(args) -> int:
    from airflow_remote_execution.cli.triggerer_command import run_component

    return run_component(args)


# Component name -> runs it until SIGTERM; returns the exit code. Add a component with one line here.
COMPONENTS: dict[str, Callable[[object], int]] = {
    "worker": _run_worker,
    "dag-processor": _run_dag_processor,
    "triggerer": _run_triggerer,
}


def parse_components(value: str | None) -> list[str]:
    names = list(dict.fromkeys(config.split_list(value or config.get("components") or "worker")))
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise SystemExit(
            f"Unknown agent component(s) {', '.join(unknown) or '(none given)'}: "
            f"use a comma-separated list of {', '.join(COMPONENTS)} (e.g. --components worker,dag-processor)"
        )
    return names


def _component_main(name: str, args) -> None:
    """Body of a component's child process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent sends SIGTERM
    try:
        import setproctitle

        setproctitle.setproctitle(f"airflow remote-execution agent: {name}")
    except ImportError:
        pass
    code = COMPONENTS[name](args)
    sys.exit(code or 0)


def run_components(names: list[str], args, poll: float = 0.5) -> int:
    """Run each component in its own process until SIGTERM/SIGINT, then forward SIGTERM and wait.

    If a component exits on its own, the others are stopped and the agent exits non-zero, so the
    process supervisor (systemd, Kubernetes) restarts the whole agent.
    """
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    children = {name: ctx.Process(target=_component_main, args=(name, args), name=name) for name in names}
    stop = {"signal": 0}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    for child in children.values():
        child.start()
        log.info("Started agent component %s (pid %s)", child.name, child.pid)
    failed = None
    while not stop["signal"]:
        dead = [c for c in children.values() if not c.is_alive()]
        if dead:
            failed = dead[0]
            log.error("Agent component %s exited with %s: stopping the others", failed.name, failed.exitcode)
            break
        time.sleep(poll)
    for child in children.values():
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    for child in children.values():
        child.join(config.getint("shutdown_timeout") + 30)
        if child.is_alive():
            log.error("Agent component %s did not stop; killing it", child.name)
            child.kill()
            child.join(10)
    if failed is not None:
        return failed.exitcode or 1
    return max((abs(c.exitcode or 0) for c in children.values()), default=0)


@providers_configuration_loaded
def agent_start(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from airflow_remote_execution.agent.task_sdk import tolerate_plane_outages

    tolerate_plane_outages()
    names = parse_components(getattr(args, "components", None))
    if len(names) == 1:
        raise SystemExit(COMPONENTS[names[0]](args))
    raise SystemExit(run_components(names, args))


@providers_configuration_loaded
def agent_dag_processor(args) -> None:
    """``airflow remote-execution agent dag-processor``: the dag processor alone, in this process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(COMPONENTS["dag-processor"](args))

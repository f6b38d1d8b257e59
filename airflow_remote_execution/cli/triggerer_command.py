"""``airflow remote-execution agent triggerer``: runs triggers of deferred remote tasks, with no metadata DB."""

from __future__ import annotations

import logging

from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution import config


def run_component(args) -> int:
    """The ``triggerer`` agent component (``agent start --components worker,triggerer``)."""
    from airflow.configuration import conf

    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.agent.triggerer import run_triggerer

    capacity = getattr(args, "capacity", None) or conf.getint("triggerer", "capacity")
    if capacity < 1:
        raise SystemExit(f"Triggerer capacity must be at least 1, not {capacity} (--capacity or [triggerer] capacity)")
    queues = config.split_list(getattr(args, "queues", None) or config.get("queues")) or None
    return run_triggerer(PlaneClient.from_config(), capacity=capacity, queues=queues)


@providers_configuration_loaded
def agent_triggerer(args) -> None:
    """``airflow remote-execution agent triggerer``: the triggerer alone, in this process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(run_component(args))

"""``airflow remote-execution agent triggerer``: runs triggers of deferred remote tasks, with no metadata DB."""

from __future__ import annotations

import logging

from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution import config


@providers_configuration_loaded
def agent_triggerer(args) -> None:
    from airflow.configuration import conf

    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.agent.triggerer import run_triggerer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    capacity = args.capacity or conf.getint("triggerer", "capacity")
    if capacity < 1:
        raise SystemExit(f"Triggerer capacity must be at least 1, not {capacity} (--capacity or [triggerer] capacity)")
    queues = config.split_list(args.queues or config.get("queues")) or None
    raise SystemExit(run_triggerer(PlaneClient.from_config(), capacity=capacity, queues=queues))

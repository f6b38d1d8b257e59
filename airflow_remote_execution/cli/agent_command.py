"""``airflow remote-execution agent start``: runs on the customer side, needs no metadata DB."""

from __future__ import annotations

import logging

from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution import config


@providers_configuration_loaded
def agent_start(args) -> None:
    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.agent.worker import AgentWorker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = AgentWorker(
        PlaneClient.from_config(),
        concurrency=args.concurrency or config.getint("concurrency"),
        queues=config.split_list(args.queues or config.get("queues")),
        execution_api_url=config.execution_api_url(),
        shutdown_timeout=config.getint("shutdown_timeout"),
    )
    raise SystemExit(worker.run())


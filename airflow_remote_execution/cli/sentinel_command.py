"""``airflow remote-execution sentinel``: probes and status reports beside an agent (no metadata DB)."""

from __future__ import annotations

import logging

from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution import config


@providers_configuration_loaded
def sentinel(args) -> None:
    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.agent.sentinel import Sentinel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or config.get("sentinel_host") or "127.0.0.1"
    port = args.port if args.port is not None else config.getint("sentinel_port")
    interval = args.report_interval if args.report_interval is not None else config.getfloat("sentinel_report_interval")
    if not 0 <= port <= 65535:
        raise SystemExit(f"Sentinel port {port} is not a TCP port: use --port or [remote_execution] sentinel_port")
    if interval <= 0:
        raise SystemExit(
            f"Report interval {interval} must be positive: use --report-interval or "
            "[remote_execution] sentinel_report_interval"
        )
    sentinel = Sentinel(PlaneClient.from_config(), report_interval=interval)
    try:
        raise SystemExit(sentinel.run(host, port))
    except OSError as e:
        raise SystemExit(
            f"Sentinel cannot listen on {host}:{port}: {e.strerror}. Use --port/--host or "
            "[remote_execution] sentinel_port/sentinel_host"
        ) from None

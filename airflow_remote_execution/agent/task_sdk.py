"""
How an agent configures Airflow's Task SDK, which reads its settings into module constants at import
(and imports early, with ``airflow`` itself): set the options and, where already loaded, the constants.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("airflow_remote_execution.agent")

# What an agent needs to ride out a plane outage of a minute or more, or a slow plane: with Airflow's
# defaults (3 failed heartbeats; 5 quick retries per call; 5 s timeout) a task is killed, or its final
# report fails, after ~15-30 s.
# Applied only where the user kept Airflow's default.
OUTAGE_DEFAULTS = {
    ("workers", "max_failed_heartbeats"): "20",  # >= 20 x [workers] min_heartbeat_interval (5 s) = 100 s
    ("workers", "execution_api_retries"): "20",
    ("workers", "execution_api_retry_wait_min"): "4.0",  # 19 waits of >= 4 s: a final report survives 76 s
    # A busy plane can take tens of seconds over a task's first call; a retried "start" after a timeout
    # finds the task already running (409) and fails it, so wait for the answer instead.
    ("workers", "execution_api_timeout"): "60.0",
}


def tolerate_plane_outages() -> dict[str, str]:
    """Apply :data:`OUTAGE_DEFAULTS` to the config, the environment (for processes the agent execs) and
    the Task SDK's constants; returns what changed."""
    from airflow.configuration import conf

    changed = {}
    for (section, key), value in OUTAGE_DEFAULTS.items():
        env = f"AIRFLOW__{section.upper()}__{key.upper()}"
        if env in os.environ or conf.get(section, key) != conf.get_default_value(section, key):
            continue  # the user chose a value
        os.environ[env] = value
        conf.set(section, key, value)
        changed[f"{section}.{key}"] = value
    _reload_task_sdk_constants()
    if changed:
        log.info("Task SDK settings for riding out plane outages: %s", changed)
    return changed


def _reload_task_sdk_constants() -> None:
    from tenacity import stop_after_attempt, wait_random_exponential

    from airflow.configuration import conf
    from airflow.sdk.api import client as sdk_client
    from airflow.sdk.execution_time import supervisor

    supervisor.MAX_FAILED_HEARTBEATS = conf.getint("workers", "max_failed_heartbeats")
    sdk_client.API_RETRIES = conf.getint("workers", "execution_api_retries")
    sdk_client.API_RETRY_WAIT_MIN = conf.getfloat("workers", "execution_api_retry_wait_min")
    sdk_client.API_RETRY_WAIT_MAX = conf.getfloat("workers", "execution_api_retry_wait_max")
    sdk_client.API_TIMEOUT = conf.getfloat("workers", "execution_api_timeout")
    retrying = getattr(sdk_client.Client.request, "retry", None)  # tenacity's decorator state, copied per call
    if retrying is not None:
        retrying.stop = stop_after_attempt(sdk_client.API_RETRIES)
        retrying.wait = wait_random_exponential(min=sdk_client.API_RETRY_WAIT_MIN, max=sdk_client.API_RETRY_WAIT_MAX)


def share_tls_with_task_sdk(ca_bundle: str, client_cert: str, client_key: str) -> None:
    """Give the Task SDK's execution-API client the agent's TLS setup (explicit ``[api]`` settings win).

    The SDK reads ``[api] ssl_ca_file``, ``client_ssl_cert`` and ``client_ssl_key`` into module
    constants at import, which happens in the agent before our settings are known; so the forked
    workload process sets both the options (for the task process it spawns) and the constants.
    """
    from airflow.configuration import conf
    from airflow.sdk.api import client as sdk_client

    key = client_key or client_cert
    for option, constant, value in (
        ("ssl_ca_file", "API_SSL_CA_FILE_PATH", ca_bundle),
        ("client_ssl_cert", "API_CLIENT_SSL_CERT", client_cert),
        ("client_ssl_key", "API_CLIENT_SSL_KEY", key),
    ):
        if value and not conf.get("api", option, fallback=None):
            os.environ[f"AIRFLOW__API__{option.upper()}"] = value
            setattr(sdk_client, constant, value)

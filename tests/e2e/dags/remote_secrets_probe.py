"""Test-only DAG: on each queue, read a connection and a variable that exist only in that agent's
secrets backend (queue ``vault``: OpenBao, queue ``aws``: Secrets Manager on moto)."""

from __future__ import annotations

from airflow.sdk import BaseHook, Variable, dag, task


@dag(schedule=None, catchup=False)
def remote_secrets_probe():
    @task
    def read_secrets() -> str:
        conn = BaseHook.get_connection("probe_db")
        return f"{conn.conn_type}://{conn.host}:{conn.port} {Variable.get('probe_greeting')}"

    read_secrets.override(task_id="on_vault", queue="vault")()
    read_secrets.override(task_id="on_aws", queue="aws")()


remote_secrets_probe()

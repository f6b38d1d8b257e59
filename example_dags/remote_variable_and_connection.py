"""Reads a Variable and a Connection on the agent, from the agent's own secrets backend or AIRFLOW_VAR_* /
AIRFLOW_CONN_* (the plane serves its own only where [remote_execution] serve_plane_secrets_to_agents allows)."""

from __future__ import annotations

from airflow.sdk import Connection, Variable, dag, task


@dag(schedule=None, catchup=False, tags=["remote-execution", "example"])
def remote_variable_and_connection():
    @task
    def read_config() -> str:
        greeting = Variable.get("remote_demo_greeting", default="hello")
        conn = Connection.get("remote_demo_http")
        print(f"{greeting}: {conn.host}")
        return f"{greeting}@{conn.host}"

    read_config()


remote_variable_and_connection()

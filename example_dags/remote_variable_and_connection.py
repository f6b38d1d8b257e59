"""Reads a Variable and a Connection on the agent (resolved through the execution API)."""

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

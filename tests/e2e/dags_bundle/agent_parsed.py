"""Parsed only by the agent's dag processor; its task runs on the agent."""

from __future__ import annotations

import socket

from airflow.sdk import DAG, task

with DAG("agent_parsed", schedule=None, tags=["remote-parsing"]):

    @task
    def where() -> str:
        return socket.gethostname()

    where()

"""Tables of the orchestration plane: agents, agent tokens and work items."""

from airflow_remote_execution.models.tables import AgentModel, AgentTokenModel, WorkItemModel

__all__ = ["AgentModel", "AgentTokenModel", "WorkItemModel"]

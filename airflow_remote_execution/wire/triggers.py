"""Wire schemas of the agent triggerer's API (``/v1/triggerers/*``, ``/v1/triggers/*``).

Kept apart from :mod:`.protocol` so both sides import only what the triggerer needs.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Trigger and Job ids are 32-bit integer columns: larger values are a 422, not a database error.
DbId = Annotated[int, Field(ge=1, le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


QueueName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class TriggererRegisterRequest(_Strict):
    hostname: str = Field(default="", max_length=250)
    capacity: int = Field(ge=1, le=100_000, description="How many triggers this triggerer runs at most.")
    queues: list[QueueName] | None = Field(
        default=None, max_length=1000, description="Queues whose deferred tasks' triggers to run; a subset of the token's."
    )


class TriggererRegisterResponse(BaseModel):
    triggerer_id: int = Field(description="Airflow Job id of this triggerer; trigger.triggerer_id points at it.")
    queues: list[str]
    sync_interval: float


class TriggerSyncRequest(_Strict):
    capacity: int = Field(ge=0, le=100_000)
    running: list[DbId] = Field(default_factory=list, max_length=100_000, description="Trigger ids it runs now.")


class TriggerWork(BaseModel):
    """A trigger to start: Airflow's ``RunTrigger`` workload and where its log goes on the agent.

    ``workload.encrypted_kwargs`` carries the *decrypted*, serialized kwargs (a JSON object): the agent
    has no fernet key, and Airflow's runner takes a JSON object as-is. Only the owning agent gets it,
    over the API's TLS.
    """

    workload: dict[str, Any]
    log_path: str | None = Field(default=None, description="Relative to the agent's [logging] base_log_folder.")


class TriggerSyncResponse(BaseModel):
    assigned: list[int] = Field(description="Every trigger this triggerer owns now; cancel the others.")
    start: list[TriggerWork] = Field(description="Owned triggers not in ``running``: start them.")


class TriggerEventRequest(_Strict):
    triggerer_id: DbId
    event: dict[str, Any] = Field(
        min_length=1,
        max_length=10,
        description="{'payload': <airflow serde form>} for a TriggerEvent, or the model of a "
        "TaskSuccessEvent/TaskFailedEvent/TaskSkippedEvent ({'task_instance_state', 'xcoms'}): 1-10 keys. "
        "Decoded only after the plane checked the trigger is this triggerer's.",
    )


class TriggerFailureRequest(_Strict):
    triggerer_id: DbId
    traceback: list[Annotated[str, StringConstraints(max_length=10_000)]] | None = Field(
        default=None, max_length=10_000, description="The traceback's lines: at most 10,000 of ≤ 10,000 characters."
    )


class TriggerAck(BaseModel):
    trigger_id: int
    accepted: bool

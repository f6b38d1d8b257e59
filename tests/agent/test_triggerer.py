"""Agent triggerer pieces that need no plane: the event wire form (round trip through the plane's
decoder, Airflow serde on both sides) and the supervisor's client answering connections/variables itself
(the plane is not asked: there is none here)."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from airflow.sdk.exceptions import ErrorType
from airflow.sdk.execution_time.comms import ErrorResponse
from airflow.triggers.base import TaskFailedEvent, TaskSkippedEvent, TaskSuccessEvent, TriggerEvent

from airflow_remote_execution.agent.triggerer import AgentTriggerRunnerSupervisor, encode_event
from airflow_remote_execution.plane.triggers import decode_event
from airflow_remote_execution.wire.triggers import TriggerEventRequest

MOMENT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "payload",
    [MOMENT, {"status": "done", "at": MOMENT, "rows": [1, 2, 3]}, "plain", 42, None],
)
def test_trigger_event_payload_survives_the_wire(payload):
    wire = TriggerEventRequest(triggerer_id=1, event=encode_event(TriggerEvent(payload)))
    decoded = decode_event(TriggerEventRequest.model_validate_json(wire.model_dump_json()).event)
    assert type(decoded) is TriggerEvent
    assert decoded.payload == payload


@pytest.mark.parametrize("event", [TaskSuccessEvent(xcoms={"k": [1, "v"]}), TaskFailedEvent(), TaskSkippedEvent()])
def test_task_end_events_keep_their_type_and_xcoms(event):
    wire = TriggerEventRequest(triggerer_id=1, event=encode_event(event))
    decoded = decode_event(TriggerEventRequest.model_validate_json(wire.model_dump_json()).event)
    assert type(decoded) is type(event)
    assert (decoded.task_instance_state, decoded.xcoms) == (event.task_instance_state, event.xcoms)


def test_unserializable_payload_is_refused_on_the_agent():
    with pytest.raises(Exception):  # noqa: B017 - serde raises TypeError/ValueError depending on the object
        encode_event(TriggerEvent(object()))


def test_supervisor_fallback_for_connections_and_variables_is_not_found():
    """The trigger process reads the agent's secrets backends first; the supervisor has no DB to fall back to."""
    client = AgentTriggerRunnerSupervisor.make_client(SimpleNamespace(plane=None, triggerer_id=1))
    conn = client.connections.get("my_conn")
    var = client.variables.get("my_var")
    assert isinstance(conn, ErrorResponse) and conn.error == ErrorType.CONNECTION_NOT_FOUND
    assert isinstance(var, ErrorResponse) and var.error == ErrorType.VARIABLE_NOT_FOUND
    assert client.variables.keys(prefix="x").keys == []

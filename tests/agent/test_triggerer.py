"""Agent triggerer pieces that need no plane: the event wire form (round trip through the plane's
decoder, Airflow serde on both sides) and the supervisor's client answering connections/variables itself
(the plane is not asked: there is none here)."""

from __future__ import annotations

import json
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


class _FakePlane:
    """A real HTTP server standing in for the plane's triggerer route: records requests, answers ``answer``."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.answer: tuple[int, bytes] = (200, b"3")
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fake.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, content = fake.answer
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_PATCH = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_triggers_requests_go_to_the_planes_triggerer_route_with_the_agent_token():
    from airflow.sdk.api.client import ServerResponseError

    from airflow_remote_execution.agent.client import PlaneClient

    fake = _FakePlane()
    try:
        supervisor = SimpleNamespace(plane=PlaneClient(fake.url, "rex_abc_secret"), triggerer_id=7)
        client = AgentTriggerRunnerSupervisor.make_client(supervisor)
        assert client.task_instances.get_count(dag_id="d", task_ids=["t"], states=["success"]).count == 3
        method, path, headers, _ = fake.seen[-1]
        assert (method, path) == ("GET", "/remote_execution/v1/triggerers/7/execution/task-instances/count"
                                         "?dag_id=d&task_ids=t&states=success")
        assert headers["authorization"] == "Bearer rex_abc_secret"  # the agent's token, not the SDK's empty one
        assert headers["airflow-api-version"]  # the plane's execution API answers in the trigger's schema

        supervisor.triggerer_id = 8  # registered again: the next request names the new triggerer
        fake.answer = (200, b'{"state": "success"}')
        assert client.dag_runs.get_state("d", "r+1:2").state == "success"
        assert fake.seen[-1][:2] == ("GET", "/remote_execution/v1/triggerers/8/execution/dag-runs/d/r+1:2/state")

        # The plane's refusal reaches the trigger as Airflow's own API error, with the plane's reason.
        fake.answer = (403, json.dumps({"detail": {"reason": "remote_execution", "message": "DAG 'x' is neither"}}).encode())
        with pytest.raises(ServerResponseError, match="DAG 'x' is neither"):
            client.task_instances.get_count(dag_id="x")
        # Connections and variables never reach the plane.
        before = len(fake.seen)
        assert client.connections.get("c").error == ErrorType.CONNECTION_NOT_FOUND
        assert len(fake.seen) == before
    finally:
        fake.server.shutdown()

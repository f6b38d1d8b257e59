"""
Every agent-facing route of the Remote Execution API (agents, leases, work, triggerers, triggers, xcom,
parsing) against malformed input: never a 5xx, and a 404 never carries an internal key (issue 13,
finding 6). Three parts, all bounded in time (~40 s on 2 cores):

* the request schemas themselves: every integer, number, string, list and dict an agent sends is bounded;
* explicit edge cases, deterministic: a complete body per route (every optional field filled), then each
  field in turn replaced by what broke the plane before (integers beyond 64 bits, NaN/Infinity, naive and
  out-of-range datetimes, 300k-element lists, empty dicts, huge strings) and each path id by 2**64 and
  friends. Typed fields must answer 4xx;
* schemathesis, its generated (valid and invalid) cases mutated with the same edge values by a hook.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.session import create_session

from airflow_remote_execution.plane import leases, tokens
from airflow_remote_execution.plane.api.app import create_app

pytestmark = pytest.mark.usefixtures("airflow_db")

AGENT_ROUTES = r"^/v1/(agents|leases|work|triggerers|triggers|xcom|parsing)/?"
BUNDLE = "fuzz-bundle"
APP = create_app()
SPEC = APP.openapi()
INT64_MAX = 2**63 - 1

# --------------------------------------------------------------------------------------- edge values

BIG_INTS = [2**64, 2**63, -(2**63) - 1, 2**31]  # beyond 64 bits, beyond int64, below it, beyond int32 columns
BAD_NUMBERS = [float("nan"), float("inf"), 1e308]
BAD_TIMES = ["2026-11-21T10:00:00", "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+14:00"]  # naive, out of range
HUGE_SCALAR_LIST = 300_000
HUGE_STRING = "x" * 10_000_001


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if _resolve(o).get("type") != "null"]
            return _resolve(options[0]) if options else {"type": "null"}
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _resolve(schema["allOf"][0])
    return schema


def _example(schema: dict, name: str = "") -> Any:
    """A valid value for ``schema`` with every optional property filled (so every field is reached)."""
    schema = _resolve(schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        if "properties" in schema:
            return {k: _example(v, k) for k, v in schema["properties"].items()}
        extra = schema.get("additionalProperties")
        return {"k": _example(extra, "k") if isinstance(extra, dict) else "v"}
    if kind == "array":
        return [_example(schema.get("items", {}), name)]
    if kind == "string":
        if schema.get("format") == "date-time":
            return "2026-11-21T10:00:00+00:00"
        if "bundle" in name:
            return BUNDLE
        if "queue" in name:
            return "default"
        return "x" * max(1, schema.get("minLength", 1))
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "number":
        return 1.0 if name != "wait" else 0.0
    if kind == "boolean":
        return False
    return "x"


def _nodes(value: Any, schema: dict, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every (path, schema) in ``value``; free-form dicts (no properties) are leaves."""
    schema = _resolve(schema)
    yield path, schema
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            yield from _nodes(v, schema["properties"][k], (*path, k))
    elif isinstance(value, list) and value:
        yield from _nodes(value[0], schema.get("items", {}), (*path, 0))


def _edges(value: Any, schema: dict) -> Iterator[tuple[str, Any, bool]]:
    """(label, replacement, must be 4xx) for one field."""
    kind = schema.get("type")
    if kind == "integer":
        for n in BIG_INTS:
            yield f"int {n}", n, True
    elif kind == "number":
        for x in BAD_NUMBERS:
            yield f"number {x}", x, True
    elif kind == "string" and schema.get("format") == "date-time":
        for t in BAD_TIMES:
            yield f"time {t}", t, True
    elif kind == "string" and "enum" not in schema and "const" not in schema:
        yield "10 MB string", HUGE_STRING, True
    elif kind == "array":
        item = value[0] if value else 1
        cap = schema.get("maxItems")
        if not isinstance(item, dict | list):
            yield f"{HUGE_SCALAR_LIST}-element list", [item] * HUGE_SCALAR_LIST, True
        else:  # lists of objects: just beyond the cap where that stays cheap (else 20,001: must not be a 5xx)
            n = min((cap or 20_000) + 1, 20_001)
            yield f"{n}-element list", [item] * n, cap is None or n > cap
    elif kind == "object" or isinstance(value, dict):
        yield "empty dict", {}, False
        if "properties" not in schema:
            yield "20k-key dict", {f"k{i}": "v" for i in range(20_000)}, True


def _replace(body: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    body = copy.deepcopy(body)
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return body


# --------------------------------------------------------------------------------------- the plane


@pytest.fixture
def plane(airflow_tables):
    """A registered agent (worker and triggerer) with queued work: the ids the routes' paths take."""
    with create_session() as s:
        token, _ = tokens.create(s, agent_name="fuzz-agent", queues=["default"], bundles=[BUNDLE])
    with create_session() as s:
        for i in range(3):
            key = TaskInstanceKey(dag_id="fuzz", task_id=f"t{i}", run_id="r", try_number=1, map_index=-1)
            leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    client = TestClient(create_app(), raise_server_exceptions=False)  # its own failed-auth throttle
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/v1/agents/register", json={"concurrency": 2}, headers=headers).status_code == 200
    triggerer = client.post("/v1/triggerers/register", json={"capacity": 5}, headers=headers)
    assert triggerer.status_code == 200, triggerer.text
    ids = {"work_id": 1, "triggerer_id": triggerer.json()["triggerer_id"], "trigger_id": 1, "bundle": BUNDLE,
           "path": "dag-runs/count"}
    return client, headers, ids


def check(response, what: str, must_refuse: bool = False) -> None:
    text = response.text[:500]
    assert response.status_code < 500, f"{what} -> {response.status_code}: {text}"
    if must_refuse:
        assert 400 <= response.status_code < 500, f"{what} -> {response.status_code} (malformed, expected 4xx): {text}"
    if response.status_code >= 400:
        detail = response.json().get("detail")
        assert detail, f"{what} -> {response.status_code} without a detail: {text}"
        if response.status_code == 404:  # says what was not found, in words: not str(KeyError('dag'))
            assert isinstance(detail, str) and " " in detail and not re.fullmatch(r"""\s*['"].*['"]\s*|\d+""", detail), (
                f"{what} -> 404 carrying an internal key: {text}"
            )


def _operations() -> list[tuple[str, str, dict]]:
    found = []
    for path, ops in SPEC["paths"].items():
        if re.match(AGENT_ROUTES, path):
            found += [(method.upper(), path, op) for method, op in ops.items()]
    return found


OPERATIONS = _operations()


def test_every_agent_route_is_covered():
    paths = {p for _, p, _ in OPERATIONS}
    for prefix in ("/v1/agents/", "/v1/leases", "/v1/work/", "/v1/triggerers/", "/v1/triggers/", "/v1/xcom/", "/v1/parsing/"):
        assert any(p.startswith(prefix) for p in paths), prefix


def _request_schema(op: dict) -> dict | None:
    return op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")


def _unbounded(schema: dict, where: str, seen: set) -> Iterator[str]:
    schema = _resolve(schema)
    kind = schema.get("type")
    if kind == "integer":
        if not (schema.get("maximum", INT64_MAX + 1) <= INT64_MAX and "minimum" in schema):
            yield f"{where}: integer without minimum and maximum <= 2**63-1"
    elif kind == "number":
        if "maximum" not in schema or ("minimum" not in schema and "exclusiveMinimum" not in schema):
            yield f"{where}: number without bounds"
    elif kind == "string":
        if not ("maxLength" in schema or "enum" in schema or "const" in schema or schema.get("format") == "date-time"):
            yield f"{where}: string without maxLength"
    elif kind == "array":
        if "maxItems" not in schema:
            yield f"{where}: list without maxItems"
        yield from _unbounded(schema.get("items", {}), f"{where}[]", seen)
    elif kind == "object" or "properties" in schema or "additionalProperties" in schema:
        if "properties" in schema:
            key = json.dumps(schema, sort_keys=True)
            if key in seen:
                return
            seen.add(key)
            for name, sub in schema["properties"].items():
                yield from _unbounded(sub, f"{where}.{name}", seen)
        elif "maxProperties" not in schema and schema.get("additionalProperties") is not False:
            yield f"{where}: dict without maxProperties"
        elif isinstance(schema.get("additionalProperties"), dict):
            yield from _unbounded(schema["additionalProperties"], f"{where}{{}}", seen)


def test_every_field_an_agent_sends_is_bounded():
    """Integers (<= 2**63-1), numbers, strings, lists and dicts of every agent request body and path."""
    problems = []
    for method, path, op in OPERATIONS:
        for param in (p for p in op.get("parameters", []) if p["in"] != "header"):  # headers: the server's limits
            problems += _unbounded(param["schema"], f"{method} {path} {param['in']} {param['name']}", set())
        if (schema := _request_schema(op)) is not None:
            problems += _unbounded(schema, f"{method} {path} body", set())
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in OPERATIONS])
def test_edge_cases_are_refused_never_a_5xx(plane, method, path):
    client, headers, ids = plane
    op = next(o for m, p, o in OPERATIONS if (m, p) == (method, path))

    failures: list[str] = []  # every failing edge case of the route, not just the first

    def call(url: str, body: Any, what: str, must_refuse: bool) -> None:
        content = None if body is None else json.dumps(body, allow_nan=True)
        response = client.request(method, url, content=content, headers={**headers, "Content-Type": "application/json"})
        try:
            check(response, f"{method} {url} with {what}", must_refuse)
        except AssertionError as e:
            failures.append(str(e).split("\n")[0])

    params = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
    url = path.format(**{p: ids[p] for p in params})
    schema = _request_schema(op)
    body = _example(schema) if schema else None
    if path == "/v1/leases":
        body["wait"] = 0
    call(url, body, "a complete valid body", False)
    for param in params:
        if _resolve(next(p for p in op["parameters"] if p["name"] == param)["schema"]).get("type") == "integer":
            for n in [*BIG_INTS, 0]:
                call(path.format(**{**{p: ids[p] for p in params}, param: n}), body, f"{param}={n}", True)
    if schema is None:
        _bad_tokens(client, method, url, body, failures)
        assert not failures, "\n".join(failures)
        return
    for field, field_schema in _nodes(body, schema):
        if not field:
            continue
        current = body
        for key in field:
            current = current[key]
        for label, new, must_refuse in _edges(current, field_schema):
            call(url, _replace(body, field, new), f"{'.'.join(map(str, field))} = {label}", must_refuse)
    _bad_tokens(client, method, url, body, failures)
    assert not failures, "\n".join(failures)


def _bad_tokens(client, method: str, url: str, body: Any, failures: list[str]) -> None:
    """No token, an unknown one, another scheme: 401 (429 once the plane throttles failed authentications)."""
    for bad in ({}, {"Authorization": "Bearer rex_0123456789abcdef_" + "A" * 43}, {"Authorization": "Basic x"}):
        response = client.request(method, url, content=json.dumps(body), headers={**bad, "Content-Type": "application/json"})
        if response.status_code not in (401, 429):
            failures.append(f"{method} {url} with {bad or 'no token'} -> {response.status_code}: {response.text[:300]}")


# --------------------------------------------------------------------------------------- schemathesis

schema = schemathesis.openapi.from_asgi("/openapi.json", APP).include(path_regex=AGENT_ROUTES)


def _edge_for(value: Any) -> st.SearchStrategy:
    if isinstance(value, bool):
        return st.just(value)
    if isinstance(value, int):
        return st.sampled_from(BIG_INTS)
    if isinstance(value, float):
        return st.sampled_from(BAD_NUMBERS)
    if isinstance(value, str):
        return st.sampled_from([*BAD_TIMES, HUGE_STRING[:300_000]])
    if isinstance(value, list):
        return st.sampled_from([[value[0] if value else 1] * 20_000, []])
    if isinstance(value, dict):
        return st.just({})
    return st.just(value)


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list) and value and len(value) < 50:
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


@schema.hook
def flatmap_body(context, body):
    """Half of the cases: one field of the generated body replaced by an edge value of its kind."""
    paths = [p for p in _paths(body) if p]
    if not paths:
        return st.just(body)

    def mutate(path: tuple) -> st.SearchStrategy:
        current = body
        for key in path:
            current = current[key]
        return _edge_for(current).map(lambda new: _replace(body, path, new))

    return st.one_of(st.just(body), st.sampled_from(paths).flatmap(mutate))


@schema.hook
def map_path_parameters(context, path_parameters):
    """Path ids drawn by schemathesis, sometimes beyond 64 bits."""
    if not path_parameters:
        return path_parameters
    return {k: (2**64 + v if isinstance(v, int) and v % 3 == 0 else v) for k, v in path_parameters.items()}


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_no_5xx(case, plane):
    client, headers, ids = plane
    if case.path == "/v1/leases" and isinstance(case.body, dict):
        case.body["wait"] = 0  # keep long-polls short
    try:
        content = json.dumps(case.body, allow_nan=True)
    except TypeError:  # no body (schemathesis' NOT_SET)
        content = None
    response = client.request(
        case.method, case.formatted_path, content=content, headers={**headers, "Content-Type": "application/json"}
    )
    check(response, f"{case.method} {case.formatted_path} {str(case.body)[:300]}")

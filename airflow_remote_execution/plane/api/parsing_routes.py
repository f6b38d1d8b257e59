"""Routes an agent's dag processor calls (``/v1/parsing/*``). The bearer token names the agent and the
DAG bundles it may write; the agent need not run a worker (or register) to parse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from airflow.utils.session import create_session

from airflow_remote_execution.plane import parsing, tokens
from airflow_remote_execution.plane.api.agent_routes import ERRORS, _bearer
from airflow_remote_execution.wire.parsing import (
    BundleFiles,
    BundleFilesResponse,
    BundleState,
    BundleStateUpdate,
    BundleSyncRequest,
    BundleSyncResponse,
    ClaimRequest,
    ClaimResponse,
    ParsingResult,
    ParsingResultResponse,
    StaleCheckRequest,
    StaleCheckResponse,
)

T = TypeVar("T")
Authorization = Annotated[str | None, Header(description="Bearer <agent token>")]
BundlePath = Annotated[str, Path(min_length=1, max_length=250, description="DAG bundle name")]
parsing_router = APIRouter(tags=["Parsing"], responses=ERRORS)


def openapi_schemas() -> dict[str, dict]:
    """Components for bodies a route reads itself (``/parsing/results``): FastAPI lists only typed params."""
    schema = ParsingResult.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {**defs, "ParsingResult": schema}


async def _with_token(authorization: str | None, fn: Callable[..., T]) -> T:
    """Run ``fn(session, token_row)`` in one transaction, in a worker thread."""

    def run() -> T:
        with create_session() as session:
            return fn(session, tokens.verify(session, _bearer(authorization)))

    return await run_in_threadpool(run)


@parsing_router.post("/parsing/bundles/sync", response_model=BundleSyncResponse)
async def sync_bundles(body: BundleSyncRequest, authorization: Authorization = None) -> BundleSyncResponse:
    """Declare the bundles this agent parses (at start): creates their ``dag_bundle`` rows; 403 if the
    token does not allow one of them."""
    states = await _with_token(authorization, lambda s, t: parsing.sync_bundles(s, t, body.bundles))
    return BundleSyncResponse(bundles=states)


@parsing_router.get("/parsing/bundles/{bundle}/state", response_model=BundleState | None)
async def get_bundle_state(bundle: BundlePath, authorization: Authorization = None) -> BundleState | None:
    """Last refresh time and version of a bundle as the plane stored them (null: no row)."""
    return await _with_token(authorization, lambda s, t: parsing.bundle_state(s, t, bundle))


@parsing_router.put("/parsing/bundles/{bundle}/state", response_model=BundleState | None)
async def put_bundle_state(
    bundle: BundlePath, body: BundleStateUpdate, authorization: Authorization = None
) -> BundleState | None:
    """Record a bundle refresh (and its new version, if any); answers the stored state."""
    return await _with_token(
        authorization, lambda s, t: parsing.update_bundle_state(s, t, bundle, body.last_refreshed, body.version)
    )


@parsing_router.put("/parsing/bundles/{bundle}/files", response_model=BundleFilesResponse)
async def put_bundle_files(
    bundle: BundlePath, body: BundleFiles, authorization: Authorization = None
) -> BundleFilesResponse:
    """The DAG files now in the bundle: DAGs and import errors of files that are gone are cleared."""
    return await _with_token(
        authorization, lambda s, t: parsing.bundle_files_present(s, t, bundle, body.observed_filelocs)
    )


@parsing_router.post(
    "/parsing/results",
    response_model=ParsingResultResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ParsingResult"}}},
        }
    },
)
async def post_result(request: Request, authorization: Authorization = None) -> ParsingResultResponse:
    """Store the result of parsing one file: serialized DAGs, import errors, warnings. The body (up to
    ``max_parsing_result_size``) is parsed and validated in a worker thread, not on the event loop."""
    raw = await request.body()
    try:
        body = await run_in_threadpool(ParsingResult.model_validate_json, raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
    dag_ids = await _with_token(authorization, lambda s, t: parsing.store_result(s, t, body))
    return ParsingResultResponse(dag_ids=dag_ids, import_errors=len(body.import_errors or {}))


@parsing_router.post("/parsing/claims", response_model=ClaimResponse)
async def claim(body: ClaimRequest, authorization: Authorization = None) -> ClaimResponse:
    """Take the re-parse requests and callbacks queued for these bundles (each is handed out once)."""
    return await _with_token(authorization, lambda s, t: parsing.claim(s, t, body.bundles, body.max_callbacks))


@parsing_router.post("/parsing/stale", response_model=StaleCheckResponse)
async def stale(body: StaleCheckRequest, authorization: Authorization = None) -> StaleCheckResponse:
    """Deactivate this agent's DAGs that their files no longer define."""
    deactivated = await _with_token(authorization, lambda s, t: parsing.deactivate_stale_dags(s, t, body))
    return StaleCheckResponse(deactivated=deactivated)

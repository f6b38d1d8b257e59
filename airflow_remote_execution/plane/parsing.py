"""
Plane side of agent DAG parsing: store what an agent's dag processor parsed, with Airflow's own functions.

An agent's ``DagFileProcessorManager`` (``agent/dag_processor.py``) parses its bundles locally and
sends each result here; this module writes the rows Airflow's own dag processor would write
(``DagFileProcessorManager.persist_parsing_result`` -> ``update_dag_parsing_results_in_db``), keeps
bundle rows and versions, and hands out re-parse requests and callbacks queued for the agent's
bundles. Every call is checked against the bundles the agent token allows.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, load_only

from airflow.models.dag import DagModel
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagcode import DagCode
from airflow.models.errors import ParseImportError

from airflow_remote_execution.plane import dag_policy, exec_guard, tokens
from airflow_remote_execution.plane.agents import AgentForbidden
from airflow_remote_execution.models import AgentTokenModel
from airflow_remote_execution.wire.parsing import (
    BundleFilesResponse,
    BundleState,
    ClaimResponse,
    ParsingResult,
    PriorityFile,
    StaleCheckRequest,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- authorisation


def allowed_bundles(token: AgentTokenModel) -> list[str]:
    return list(token.bundles or [])


def bundles_refused_to(session: Session, token: AgentTokenModel) -> list[str]:
    """Agent-parsed bundles whose work ``token`` may not lease."""
    return sorted(tokens.bundles_parsed_by_agents(session) - set(allowed_bundles(token)))


def check_bundles(token: AgentTokenModel, bundles: Iterable[str]) -> list[str]:
    """The bundles, if the token allows all of them; else :class:`AgentForbidden` naming what to fix."""
    bundles = list(dict.fromkeys(bundles))
    allowed = allowed_bundles(token)
    outside = [b for b in bundles if b not in allowed]
    if outside:
        raise AgentForbidden(
            f"Bundle(s) {', '.join(outside)} are outside token {token.id}'s bundles "
            f"({', '.join(allowed) or 'none'}); create a token with "
            f"`tokens create ... --bundles {','.join(sorted({*allowed, *outside}))}` "
            "or remove them from the agent's [dag_processor] dag_bundle_config_list"
        )
    return bundles


def _check_dag_ownership(session: Session, token: AgentTokenModel, bundle_name: str, dag_ids: list[str]) -> None:
    """A DAG id already stored from another bundle may only be taken over by an agent allowed that bundle,
    so one team's agent cannot replace another team's DAG by reusing its id."""
    if not dag_ids:
        return
    allowed = set(allowed_bundles(token))
    owners = session.execute(
        select(DagModel.dag_id, DagModel.bundle_name).where(DagModel.dag_id.in_(dag_ids))
    ).all()
    taken = sorted(f"{dag_id} (bundle {owner})" for dag_id, owner in owners if owner != bundle_name and owner not in allowed)
    if taken:
        raise AgentForbidden(
            f"DAG id(s) {', '.join(taken)} belong to bundles token {token.id} does not allow: "
            f"rename the DAG(s) in bundle {bundle_name}"
        )


# ---------------------------------------------------------------------------------------- bundles


def _state(row: DagBundleModel) -> BundleState:
    return BundleState(name=row.name, last_refreshed=row.last_refreshed, version=row.version)


def sync_bundles(session: Session, token: AgentTokenModel, names: list[str]) -> list[BundleState]:
    """Make sure the agent's bundles have active ``dag_bundle`` rows (what ``sync_bundles_to_db`` does for
    a dag processor's own config); other bundles are left alone, as for a processor of a bundle subset."""
    rows = []
    for name in check_bundles(token, names):
        row = session.get(DagBundleModel, name)
        if row is None:
            row = DagBundleModel(name=name)
            session.add(row)
            log.info("Added DAG bundle %s for agent %s", name, token.agent_name)
        row.active = True
        rows.append(row)
    session.flush()
    return [_state(r) for r in rows]


def bundle_state(session: Session, token: AgentTokenModel, name: str) -> BundleState | None:
    check_bundles(token, [name])
    row = session.get(DagBundleModel, name)
    return _state(row) if row else None


def update_bundle_state(
    session: Session, token: AgentTokenModel, name: str, last_refreshed, version
) -> BundleState | None:
    """As ``DagFileProcessorManager.update_bundle_state``: ``version`` None leaves the stored one."""
    check_bundles(token, [name])
    values = {"last_refreshed": last_refreshed}
    if version is not None:
        values["version"] = version
    session.execute(update(DagBundleModel).where(DagBundleModel.name == name).values(**values))
    return bundle_state(session, token, name)


def bundle_files_present(
    session: Session, token: AgentTokenModel, name: str, observed_filelocs: list[str]
) -> BundleFilesResponse:
    """After a bundle refresh: DAGs of files gone from the bundle go stale, their import errors go
    (``deactivate_deleted_dags`` and ``clear_orphaned_import_errors`` of Airflow's manager)."""
    from airflow.models.asset import remove_references_to_deleted_dags

    check_bundles(token, [name])
    observed = set(observed_filelocs)
    deactivated = DagModel.deactivate_deleted_dags(bundle_name=name, rel_filelocs=observed, session=session)
    if deactivated:
        remove_references_to_deleted_dags(session=session)
    errors = session.scalars(
        select(ParseImportError)
        .where(ParseImportError.bundle_name == name)
        .options(load_only(ParseImportError.filename))
    )
    cleared = 0
    for error in errors:
        if error.filename not in observed:
            session.delete(error)
            cleared += 1
    session.flush()
    return BundleFilesResponse(dags_deactivated=deactivated, import_errors_cleared=cleared)


# ---------------------------------------------------------------------------------------- results

# Airflow's persistence reads two things from the files, which are on the agent, not here: DagCode
# the DAG's source, and import-error listeners the bundle's path (from the plane's own bundle config).
# While an agent's result is stored, both come from the agent's result instead.
_agent_file: ContextVar[tuple[str, str, str | None] | None] = ContextVar("remote_execution_agent_file", default=None)
_read_source_file = DagCode.get_code_from_file
_plane_full_file_path = ParseImportError.full_file_path


def _source_or_file(fileloc: str) -> str:
    current = _agent_file.get()
    return _read_source_file(fileloc) if current is None else current[0]


def _agent_full_file_path(self: ParseImportError) -> str:
    current = _agent_file.get()
    if current is None or current[1] != self.bundle_name:
        return _plane_full_file_path(self)
    return "/".join([current[2] or f"<agent bundle {self.bundle_name}>", self.filename or ""])


DagCode.get_code_from_file = staticmethod(_source_or_file)
ParseImportError.full_file_path = _agent_full_file_path


def source_note(result: ParsingResult) -> str:
    return (
        f"# The source of {result.relative_fileloc or 'this DAG'} stays on the agent "
        f"(bundle {result.bundle_name!r}, version {result.bundle_version or 'unversioned'}).\n"
        "# Remote Execution stores only the serialized DAG; set [remote_execution] send_dag_source = True\n"
        "# on the agent to show the code here.\n"
    )


@contextlib.contextmanager
def _from_agent(result: ParsingResult) -> Iterator[None]:
    source = result.source if result.source is not None else source_note(result)
    reset = _agent_file.set((source, result.bundle_name, result.bundle_path))
    try:
        yield
    finally:
        _agent_file.reset(reset)


def store_result(session: Session, token: AgentTokenModel, result: ParsingResult) -> list[str]:
    """Store one parsed file exactly as Airflow's dag processor would; returns the DAG ids written."""
    from airflow.dag_processing.manager import DagFileProcessorManager
    from airflow.dag_processing.processor import DagFileParsingResult
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    check_bundles(token, [result.bundle_name])
    dags = [LazyDeserializedDAG(data=_accepted(d.data), last_loaded=d.last_loaded) for d in result.serialized_dags]
    dag_ids = [dag.dag_id for dag in dags]
    _check_dag_ownership(session, token, result.bundle_name, dag_ids)
    if session.get(DagBundleModel, result.bundle_name) is None:
        sync_bundles(session, token, [result.bundle_name])
    warnings = [w for w in result.warnings or [] if w.get("dag_id") in dag_ids]
    parsed = DagFileParsingResult(
        fileloc=result.relative_fileloc or "",
        serialized_dags=dags,
        warnings=warnings,
        import_errors=result.import_errors,
    )
    # Airflow's own persistence; it uses nothing of the manager instance, so none is built here. Triggers it
    # makes (asset watchers of these DAGs) are parked for agents' triggerers (exec_guard).
    with _from_agent(result), exec_guard.on_agents_behalf():
        DagFileProcessorManager.persist_parsing_result(
            None,  # type: ignore[arg-type]
            bundle_name=result.bundle_name,
            bundle_version=result.bundle_version,
            version_data=result.version_data,
            parsing_result=parsed,
            run_duration=result.run_duration,
            relative_fileloc=result.relative_fileloc,
            session=session,
        )
    return dag_ids


def _accepted(data: dict) -> dict:
    """The serialized DAG if Airflow's schema and our policy accept it (else a 422 naming what is wrong):
    deserialized once with Airflow's own decoders, which import only core or registered classes."""
    from airflow.serialization.serialized_objects import DagSerialization

    data = dag_policy.check(data)
    try:
        DagSerialization.validate_schema(data)
        DagSerialization.from_dict(data)
    except Exception as e:  # noqa: BLE001 - whatever Airflow's decoders raise, the agent sent it
        dag_id = data["dag"]["dag_id"]
        raise dag_policy.DagRefused(f"DAG {dag_id}: not a valid serialized DAG: {type(e).__name__}: {e}"[:2000]) from None
    return data


# ---------------------------------------------------------------------------------------- requests


def claim(session: Session, token: AgentTokenModel, bundles: list[str], max_callbacks: int) -> ClaimResponse:
    """Claim re-parse requests and dag-processor callbacks queued for ``bundles`` (rows are deleted, as
    Airflow's manager does when it takes them)."""
    from airflow.models.dagbag import DagPriorityParsingRequest
    from airflow.models.db_callback_request import DbCallbackRequest
    from airflow.utils.sqlalchemy import with_row_locks

    bundles = check_bundles(token, bundles)
    files = []
    for request in session.scalars(
        select(DagPriorityParsingRequest).where(DagPriorityParsingRequest.bundle_name.in_(bundles))
    ):
        files.append(PriorityFile(bundle_name=request.bundle_name, relative_fileloc=request.relative_fileloc))
        session.delete(request)
    callbacks = []
    if max_callbacks:
        query = with_row_locks(
            select(DbCallbackRequest)
            .where(DbCallbackRequest.bundle_name.in_(bundles))
            .order_by(DbCallbackRequest.priority_weight.desc())
            .limit(max_callbacks),
            of=DbCallbackRequest,
            session=session,
            skip_locked=True,
        )
        for row in session.scalars(query):
            try:
                callbacks.append(json.loads(row.get_callback_request().to_json()))
            except Exception:
                log.exception("Dropping unreadable callback request %s", row.id)
            session.delete(row)
    session.flush()
    return ClaimResponse(priority_files=files, callbacks=callbacks)


def deactivate_stale_dags(session: Session, token: AgentTokenModel, req: StaleCheckRequest) -> list[str]:
    """``DagFileProcessorManager.deactivate_stale_dags`` for the agent's bundles: a DAG whose file was
    parsed ``stale_dag_threshold`` seconds after the DAG was last seen is gone from that file."""
    from airflow.models.dagwarning import DagWarning

    bundles = check_bundles(token, {p.bundle_name for p in req.last_parsed})
    if not bundles:
        return []
    finished = {(p.bundle_name, p.relative_fileloc): p.last_finish_time for p in req.last_parsed}
    threshold = timedelta(seconds=req.stale_dag_threshold)
    stale = []
    rows = session.execute(
        select(DagModel.dag_id, DagModel.bundle_name, DagModel.relative_fileloc, DagModel.last_parsed_time).where(
            ~DagModel.is_stale, DagModel.bundle_name.in_(bundles)
        )
    )
    for dag_id, bundle, rel, last_parsed in rows:
        if rel is None or last_parsed is None:
            continue
        # Zip-packaged DAGs are keyed by the archive, as in Airflow's manager.
        finish = finished.get((bundle, rel)) or finished.get((bundle, str(Path(rel).parent)))
        if finish and last_parsed + threshold < finish:
            stale.append(dag_id)
    if stale:
        session.execute(
            update(DagModel)
            .where(DagModel.dag_id.in_(stale))
            .values(is_stale=True)
            .execution_options(synchronize_session=False)
        )
        log.info("Deactivated %d stale DAG(s) of agent %s: %s", len(stale), token.agent_name, ", ".join(stale))
    # What the manager's purge_inactive_dag_warnings does each loop, here once per stale check.
    session.execute(
        delete(DagWarning)
        .where(DagWarning.dag_id.in_(select(DagModel.dag_id).where(DagModel.is_stale, DagModel.bundle_name.in_(bundles))))
        .execution_options(synchronize_session=False)
    )
    return stale

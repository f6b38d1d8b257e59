"""
The agent's dag processor: Airflow's own parsing loop, with the metadata DB swapped for the plane's API.

``AgentDagProcessorManager`` subclasses ``DagFileProcessorManager`` and overrides exactly the AIP-92
hooks where the stock manager reads or writes the metadata DB: bundle rows and versions, parsing
results, re-parse requests, callbacks, removed files and stale DAGs. Parsing itself (bundle refresh,
file queue, parser processes, timeouts, callbacks) is Airflow's code, unchanged, so DAG files and
callbacks run here and the plane receives nothing but serialized DAGs, import errors and warnings.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import httpx

from airflow.dag_processing.manager import BundleState, DagFileInfo, DagFileProcessorManager

from airflow_remote_execution.agent.client import PlaneClient, PlaneError
from airflow_remote_execution.wire.parsing import (
    ParsedFile,
    ParsingResult,
    SerializedDagPayload,
    StaleCheckRequest,
)

if TYPE_CHECKING:
    from airflow.callbacks.callback_requests import CallbackRequest
    from airflow.dag_processing.processor import DagFileParsingResult, DagFileProcessorProcess
    from airflow.sdk.api.client import Client

log = logging.getLogger("airflow_remote_execution.agent.dag_processor")

_NO_METADATA_API = (
    "Remote Execution agents have no metadata DB: at parse time Variables and Connections come only from "
    "the agent's own secrets backends (environment variables, Vault, ...)"
)


def _no_metadata_api(request: httpx.Request) -> httpx.Response:
    """Stands in for the stock manager's in-process execution API (which reads the metadata DB):
    parse-time Variable/Connection/XCom lookups are 'not found', with a message saying why."""
    return httpx.Response(404, json={"detail": {"reason": "not_found", "message": _NO_METADATA_API}})


@attrs.define(kw_only=True)
class AgentDagProcessorManager(DagFileProcessorManager):
    """``DagFileProcessorManager`` whose DB reads and writes go to the plane's ``/v1/parsing`` routes."""

    plane: PlaneClient
    send_source: bool = False
    _api_server: Any = attrs.field(default=None, init=False)  # the stock in-process API needs the DB
    _claimed_callbacks: list[dict] = attrs.field(factory=list, init=False)
    _parsed_at: dict[tuple[str, str], tuple[str | None, dict | None]] = attrs.field(factory=dict, init=False)

    # ------------------------------------------------------------------ process setup

    def prepare_server_process_context(self) -> None:
        """Stay a 'client' process: secrets come from the agent's own backends, never the metadata DB."""

    @functools.cached_property
    def client(self) -> Client:
        from airflow.sdk.api.client import Client

        client = Client(base_url=None, token="", dry_run=True, transport=httpx.MockTransport(_no_metadata_api))
        client.base_url = "http://agent-without-metadata-db.invalid./"  # type: ignore[assignment]
        return client

    def _get_team_names(self, bundle_names) -> dict[str, str | None]:
        return {name: None for name in bundle_names}  # multi-team lives on the plane

    def sync_bundles(self) -> None:
        """Declare this agent's bundles to the plane (it creates their rows); a bundle the token does not
        allow stops the agent with the plane's explanation."""
        names = [b.name for b in self.get_all_bundles()]
        if self.bundle_names_to_parse:
            names = [n for n in names if n in self.bundle_names_to_parse]
        if not names:
            raise SystemExit("No DAG bundles to parse: set [dag_processor] dag_bundle_config_list on the agent")
        attempt = 0
        while True:
            try:
                states = self.plane.sync_bundles(names)
                break
            except PlaneError as e:
                if not e.retryable:
                    raise SystemExit(f"The plane refused this agent's DAG bundles: {e.detail}") from None
                delay = random.uniform(0, min(30.0, 0.5 * 2**attempt))
                attempt += 1
                log.warning("Plane unreachable (%s); retrying bundle sync in %.1fs", e.detail, delay)
                time.sleep(delay)
        log.info("Parsing DAG bundles %s for the plane at %s", ", ".join(s.name for s in states), self.plane.base)

    # ------------------------------------------------------------------ bundle state

    def get_bundle_state(self, bundle_name: str, *, session=None) -> BundleState | None:
        state = self.plane.bundle_state(bundle_name)
        return BundleState(last_refreshed=state.last_refreshed, version=state.version) if state else None

    def update_bundle_state(self, bundle_name: str, *, last_refreshed: datetime, version: str | None, session=None):
        self.plane.update_bundle_state(bundle_name, last_refreshed, version)

    def deactivate_deleted_dags(self, bundle_name: str, present: set[DagFileInfo]) -> None:
        """Also clears import errors of files that are gone (the stock manager's
        ``clear_orphaned_import_errors``, for the same files) in the same call."""
        try:
            self.plane.bundle_files(bundle_name, sorted(self._get_observed_filelocs(present)))
        except PlaneError as e:
            log.warning("Could not report the files of bundle %s to the plane (%s); next refresh retries",
                        bundle_name, e.detail)

    def clear_orphaned_import_errors(self, bundle_name: str, observed_filelocs: set[str], *, session=None):
        """Done by the plane in :meth:`deactivate_deleted_dags`."""

    # ------------------------------------------------------------------ results

    def _create_process(self, dag_file: DagFileInfo) -> DagFileProcessorProcess:
        # Remember the bundle version the file is parsed at. The stock manager labels a result with
        # the version current when it is *collected*: if the bundle moved on meanwhile, old content
        # gets the new commit, and Airflow's write_dag then moves the old DAG version (and the runs
        # on it) to that commit.
        name = dag_file.bundle_name
        self._parsed_at[(name, str(dag_file.rel_path))] = (
            self._bundle_versions.get(name), self._bundle_version_data.get(name)
        )
        return super()._create_process(dag_file)

    def handle_parsing_result(self, file: DagFileInfo, proc: DagFileProcessorProcess, *, session=None) -> None:
        # Airflow's own bookkeeping (stats, metrics, retry throttling), without the DB session its
        # ``@provide_session`` would open: persistence below goes to the plane.
        DagFileProcessorManager.handle_parsing_result.__wrapped__(self, file, proc, session=None)

    def persist_parsing_result(
        self,
        *,
        bundle_name: str,
        bundle_version: str | None,
        version_data: dict | None,
        parsing_result: DagFileParsingResult,
        run_duration: float,
        relative_fileloc: str | None,
        session=None,
    ) -> None:
        """Send the result to the plane, which stores it with the stock ``persist_parsing_result``."""
        if relative_fileloc is not None and (bundle_name, relative_fileloc) in self._parsed_at:
            bundle_version, version_data = self._parsed_at.pop((bundle_name, relative_fileloc))
        warnings = [w if isinstance(w, dict) else _warning_dict(w) for w in parsing_result.warnings or []]
        bundle_path = next((str(b.path) for b in self._dag_bundles if b.name == bundle_name), None)
        result = ParsingResult(
            bundle_name=bundle_name,
            bundle_version=bundle_version,
            bundle_path=bundle_path,
            version_data=version_data,
            relative_fileloc=relative_fileloc,
            run_duration=run_duration,
            serialized_dags=[
                SerializedDagPayload(data=d.data, last_loaded=d.last_loaded) for d in parsing_result.serialized_dags
            ],
            import_errors=parsing_result.import_errors,
            warnings=warnings,
            source=_read_source(parsing_result.fileloc) if self.send_source else None,
        )
        answer = self.plane.parsing_result(result)
        log.debug("Sent %s of bundle %s: DAGs %s", relative_fileloc, bundle_name, answer.dag_ids)

    # ------------------------------------------------------------------ requests from the plane

    def claim_priority_files(self) -> list[DagFileInfo]:
        """One call a loop takes both re-parse requests and callbacks; callbacks wait for
        :meth:`fetch_callbacks` later in the same loop."""
        bundles = {b.name: b for b in self._dag_bundles}
        if not bundles:
            return []
        try:
            claimed = self.plane.claim_parsing_requests(list(bundles), self.max_callbacks_per_loop)
        except PlaneError as e:
            log.warning("Could not fetch re-parse requests and callbacks from the plane: %s", e.detail)
            return []
        self._claimed_callbacks.extend(claimed.callbacks)
        return [
            DagFileInfo(
                rel_path=Path(f.relative_fileloc),
                bundle_name=f.bundle_name,
                bundle_path=bundles[f.bundle_name].path,
            )
            for f in claimed.priority_files
            if f.bundle_name in bundles
        ]

    def fetch_callbacks(self) -> list[CallbackRequest]:
        from pydantic import TypeAdapter

        from airflow.callbacks.callback_requests import CallbackRequest

        adapter = TypeAdapter(CallbackRequest)
        requests, self._claimed_callbacks = self._claimed_callbacks, []
        callbacks = []
        for data in requests:
            try:
                callbacks.append(adapter.validate_python(data))
            except ValueError as e:
                log.error("Skipping a callback request this agent cannot read (%s): %s", data.get("type"), e)
        return callbacks

    # ------------------------------------------------------------------ clean-up

    def deactivate_stale_dags(self, last_parsed: dict[DagFileInfo, datetime | None], *, session=None) -> None:
        request = StaleCheckRequest(
            last_parsed=[
                ParsedFile(bundle_name=f.bundle_name, relative_fileloc=str(f.rel_path), last_finish_time=t)
                for f, t in last_parsed.items()
                if t is not None
            ],
            stale_dag_threshold=self.stale_dag_threshold,
        )
        if not request.last_parsed:
            return
        try:
            deactivated = self.plane.deactivate_stale_dags(request)
        except PlaneError as e:
            log.warning("Stale DAG check on the plane failed (%s); the next check retries", e.detail)
            return
        if deactivated:
            log.info("The plane deactivated stale DAGs %s", ", ".join(deactivated))

    def purge_inactive_dag_warnings(self) -> None:
        """The plane purges warnings of stale DAGs during :meth:`deactivate_stale_dags`."""


def _warning_dict(warning) -> dict:
    return {"dag_id": warning.dag_id, "warning_type": str(warning.warning_type), "message": warning.message}


def _read_source(fileloc: str) -> str | None:
    from airflow.utils.file import open_maybe_zipped

    try:
        with open_maybe_zipped(fileloc, "r") as f:
            return f.read()
    except OSError as e:
        log.warning("Cannot read %s to send its source: %s", fileloc, e)
        return None


def run_dag_processor(client: PlaneClient | None = None, *, send_source: bool | None = None) -> int:
    """Run the agent's dag processor until SIGTERM (Airflow's manager exits the process on it)."""
    from airflow_remote_execution import config

    manager = AgentDagProcessorManager(
        max_runs=-1,
        plane=client or PlaneClient.from_config(),
        send_source=config.getboolean("send_dag_source") if send_source is None else send_source,
    )
    manager.run()
    return 0

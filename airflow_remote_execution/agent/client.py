"""HTTP client for the Remote Execution API: the agent's only way to talk to the plane.

``requests`` with urllib3 retries for connection failures and 502/503/504, ``HTTPS_PROXY`` /
``NO_PROXY`` from the environment, a custom CA bundle and a client certificate. The token is sent
only in the Authorization header and never logged or shown in ``repr``.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from airflow_remote_execution import config
from airflow_remote_execution.wire.api import (
    HeartbeatRequest,
    HeartbeatResponse,
    Lease,
    LeaseRequest,
    LeaseResponse,
    RegisterRequest,
    RegisterResponse,
    SentinelReport,
    SentinelReportResponse,
    StartRequest,
    StartResponse,
    TaskProcess,
    WhoAmIResponse,
    WorkState,
)

log = logging.getLogger(__name__)


class PlaneError(Exception):
    """The plane answered with an error; ``status`` is the HTTP status (0: not reachable)."""

    def __init__(self, status: int, detail: str, retryable: bool | None = None):
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.retryable = (status == 0 or status >= 500 or status == 429) if retryable is None else retryable


class LeaseLost(PlaneError):
    """409: the work is no longer this agent's (another lease, stale fence, revoked)."""


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "WRONG_VERSION_NUMBER", "handshake"):
        if marker in text:
            start = text.find(marker)
            return text[start : start + 80].split("(_ssl")[0].strip(" ')")
    return type(exc).__name__


class PlaneClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        ca_bundle: str = "",
        client_cert: str = "",
        client_key: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.base = api_url.rstrip("/") + config.API_V1
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.http.headers["User-Agent"] = "airflow-remote-execution-agent"
        # Passed on every request: a session-level ``verify`` loses to REQUESTS_CA_BUNDLE in requests.
        self.verify: str | bool = ca_bundle or True
        self.tls = (ca_bundle, client_cert, client_key)
        if client_cert:
            self.http.cert = (client_cert, client_key) if client_key else client_cert
        retry = Retry(
            total=3,
            connect=3,
            read=0,
            status=3,
            status_forcelist=(502, 503, 504),
            allowed_methods=None,
            backoff_factor=0.2,
            backoff_max=2.0,
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)

    @classmethod
    def from_config(cls) -> PlaneClient:
        return cls(
            config.get("api_url"),
            config.agent_token(),
            ca_bundle=config.get("ca_bundle"),
            client_cert=config.get("client_cert"),
            client_key=config.get("client_key"),
            timeout=config.getfloat("request_timeout"),
        )

    def reload_token(self) -> bool:
        """Re-read the token from config (``token_file``); True if it changed and is now used."""
        try:
            token = config.agent_token()
        except SystemExit:  # unreadable or empty file: keep the current token
            return False
        header = f"Bearer {token}"
        if header == self.http.headers.get("Authorization"):
            return False
        self.http.headers["Authorization"] = header
        return True

    def __repr__(self) -> str:
        return f"PlaneClient({self.base!r})"

    def _post(
        self, path: str, body, model=None, timeout: float | None = None, method: str = "POST", headers: dict | None = None
    ):
        """POST ``body``; return the answer validated as ``model`` (or raw), or raise PlaneError. ``headers``:
        filled with the answer's headers."""
        try:
            response = self.http.request(
                method,
                self.base + path,
                data=None if method == "GET" else body.model_dump_json() if body is not None else "{}",
                headers={"Content-Type": "application/json"},
                timeout=timeout or self.timeout,
                verify=self.verify,
            )
        except requests.exceptions.SSLError as e:
            raise PlaneError(
                0,
                f"TLS with {self.base} failed ({_reason(e)}): check [remote_execution] ca_bundle "
                "(the CA that signed the plane's certificate) and client_cert/client_key",
                retryable=False,
            ) from None
        except requests.Timeout:
            raise PlaneError(0, f"Request to {self.base} timed out") from None
        except requests.RequestException as e:
            raise PlaneError(0, f"Plane not reachable at {self.base}: {type(e).__name__}") from None
        if headers is not None:
            headers.update(response.headers)
        if response.status_code < 300:
            try:
                data = response.json()
                return model.model_validate(data) if model else data
            except ValueError:  # not JSON, or not the expected schema (pydantic errors are ValueErrors)
                raise PlaneError(
                    response.status_code,
                    f"Unexpected answer from {self.base}{path} (a proxy page? check [remote_execution] api_url)",
                ) from None
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text[:500]
        if not isinstance(detail, str):
            detail = str(detail)
        if response.status_code == 409:
            raise LeaseLost(409, detail)
        raise PlaneError(response.status_code, detail)

    def register(self, req: RegisterRequest) -> RegisterResponse:
        return self._post("/agents/register", req, RegisterResponse)

    def heartbeat(self, req: HeartbeatRequest) -> HeartbeatResponse:
        return self._post("/agents/heartbeat", req, HeartbeatResponse)

    def lease(self, slots: int, wait: float) -> list[Lease]:
        """Long-poll for work. An empty answer with Retry-After (the plane holds too many of this token's
        long-polls) is waited out here, so the caller's loop does not spin."""
        headers: dict = {}
        answer = self._post("/leases", LeaseRequest(slots=slots, wait=wait), LeaseResponse, wait + self.timeout,
                            headers=headers)
        if not answer.leases and (delay := _seconds(headers.get("Retry-After"))):
            time.sleep(min(delay, wait))
        return answer.leases

    def start(self, work_id: int, fence: int, task: TaskProcess | None = None) -> StartResponse:
        """Confirm the lease (LeaseLost: do not start); with ``task``, the plane also reports the task started."""
        return self._post(f"/work/{work_id}/start", StartRequest(fence=fence, task=task), StartResponse)

    def finish(self, work_id: int, fence: int, outcome: WorkState, info: str | None = None) -> None:
        from airflow_remote_execution.wire.api import FinishRequest

        self._post(f"/work/{work_id}/finish", FinishRequest(fence=fence, outcome=outcome, info=info))

    def release(self, work_id: int, fence: int) -> None:
        from airflow_remote_execution.wire.api import FencedRequest

        self._post(f"/work/{work_id}/release", FencedRequest(fence=fence))

    # ---------------------------------------------------------------- the agent's triggerer

    def register_triggerer(self, hostname: str, capacity: int, queues: list[str] | None):
        from airflow_remote_execution.wire.triggers import TriggererRegisterRequest, TriggererRegisterResponse

        body = TriggererRegisterRequest(hostname=hostname, capacity=capacity, queues=queues or None)
        return self._post("/triggerers/register", body, TriggererRegisterResponse)

    def sync_triggers(self, triggerer_id: int, capacity: int, running: list[int]):
        from airflow_remote_execution.wire.triggers import TriggerSyncRequest, TriggerSyncResponse

        body = TriggerSyncRequest(capacity=capacity, running=sorted(running))
        return self._post(f"/triggerers/{triggerer_id}/sync", body, TriggerSyncResponse)

    def stop_triggerer(self, triggerer_id: int) -> None:
        self._post(f"/triggerers/{triggerer_id}/stop", None)

    def trigger_event(self, triggerer_id: int, trigger_id: int, event: dict) -> None:
        from airflow_remote_execution.wire.triggers import TriggerEventRequest

        self._post(f"/triggers/{trigger_id}/event", TriggerEventRequest(triggerer_id=triggerer_id, event=event))

    def trigger_failure(self, triggerer_id: int, trigger_id: int, traceback: list[str] | None) -> None:
        from airflow_remote_execution.wire.triggers import TriggerFailureRequest

        body = TriggerFailureRequest(triggerer_id=triggerer_id, traceback=traceback)
        self._post(f"/triggers/{trigger_id}/failure", body)

    def whoami(self) -> WhoAmIResponse:
        """The token's agent, queues, expiry and the plane's clock (``GET /agents/me``)."""
        return self._post("/agents/me", None, WhoAmIResponse, method="GET")

    def sentinel_report(self, report: SentinelReport) -> SentinelReportResponse:
        """The sentinel's aggregate status of this agent (``POST /agents/sentinel``)."""
        return self._post("/agents/sentinel", report, SentinelReportResponse)

    # ---------------------------------------------------------------- parsing (the agent's dag processor)

    def sync_bundles(self, bundles: list[str]) -> list:
        from airflow_remote_execution.wire.parsing import BundleSyncRequest, BundleSyncResponse

        return self._post("/parsing/bundles/sync", BundleSyncRequest(bundles=bundles), BundleSyncResponse).bundles

    def bundle_state(self, bundle: str):
        from airflow_remote_execution.wire.parsing import BundleState

        data = self._post(f"/parsing/bundles/{quote(bundle, safe='')}/state", None, method="GET")
        return BundleState.model_validate(data) if data is not None else None

    def update_bundle_state(self, bundle: str, last_refreshed, version: str | None) -> None:
        from airflow_remote_execution.wire.parsing import BundleStateUpdate

        body = BundleStateUpdate(last_refreshed=last_refreshed, version=version)
        self._post(f"/parsing/bundles/{quote(bundle, safe='')}/state", body, method="PUT")

    def bundle_files(self, bundle: str, observed_filelocs: list[str]):
        from airflow_remote_execution.wire.parsing import BundleFiles, BundleFilesResponse

        body = BundleFiles(observed_filelocs=sorted(observed_filelocs))
        return self._post(f"/parsing/bundles/{quote(bundle, safe='')}/files", body, BundleFilesResponse, method="PUT")

    def parsing_result(self, result):
        from airflow_remote_execution.wire.parsing import ParsingResultResponse

        return self._post("/parsing/results", result, ParsingResultResponse)

    def claim_parsing_requests(self, bundles: list[str], max_callbacks: int):
        from airflow_remote_execution.wire.parsing import ClaimRequest, ClaimResponse

        return self._post("/parsing/claims", ClaimRequest(bundles=bundles, max_callbacks=max_callbacks), ClaimResponse)

    def deactivate_stale_dags(self, request) -> list[str]:
        from airflow_remote_execution.wire.parsing import StaleCheckResponse

        return self._post("/parsing/stale", request, StaleCheckResponse).deactivated


def _seconds(retry_after: str | None) -> float:
    """A Retry-After header's delay in seconds (the plane sends seconds); 0 if absent or unreadable."""
    try:
        return max(float(retry_after), 0.0) if retry_after else 0.0
    except ValueError:
        return 0.0

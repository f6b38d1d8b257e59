"""
Agent-side checks: one registry that ``airflow remote-execution check`` (the doctor) and the
sentinel both run. A check is a function returning a :class:`CheckResult`; raising counts as a
failure whose detail is the exception. Register with ``@check("name")``; a check takes no
argument or one :class:`CheckOptions`.

The checks of other parts live in their own modules (XCom, bundles, ...), listed in
:data:`CHECK_MODULES`; :func:`load_checks` imports them, so adding a part's checks is one line there.
This module holds the agent's own: ``api``, ``token``, ``clock``, ``secrets`` and ``disk``.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

CheckFn = Callable[..., "CheckResult"]
CHECKS: dict[str, CheckFn] = {}

# Modules whose import registers checks (``@check``); a module not installed yet is left out.
CHECK_MODULES: tuple[str, ...] = (
    "airflow_remote_execution.agent.checks",
    "airflow_remote_execution.xcom",
    "airflow_remote_execution.agent.bundles",
    "airflow_remote_execution.agent.sentinel",
)

CLOCK_WARN_SECONDS = 5.0  # the execution API's JWTs carry iat/nbf/exp: skew breaks them
CLOCK_FAIL_SECONDS = 30.0
DISK_FAIL_BYTES = 1 << 30  # logs and task scratch space: below 1 GiB tasks start failing
DISK_WARN_BYTES = 5 << 30
TOKEN_WARN_DAYS = 7
PROBE_NAME = "remote-execution-doctor-probe"  # looked up when no probe is given: not-found proves reachability


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""  # what to fix; shown on failure
    skipped: bool = False  # not configured here: neither pass nor fail
    warning: bool = False  # passes, but worth attention (e.g. clock skew of a few seconds)

    @property
    def status(self) -> str:
        if self.skipped:
            return "SKIP"
        if not self.ok:
            return "FAIL"
        return "WARN" if self.warning else "PASS"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


@dataclass(frozen=True)
class CheckOptions:
    """What a run of the doctor was asked for beyond the configuration (``--probe-conn`` ...)."""

    probe_conn: str | None = None
    probe_var: str | None = None


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    def register(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn

    return register


def load_checks() -> list[CheckResult]:
    """Import :data:`CHECK_MODULES`; a module that exists but fails to import is a failed check."""
    failures = []
    for module in CHECK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module is there, something it imports is not
                failures.append(CheckResult(f"load:{module}", False, f"{type(e).__name__}: {e}"))
        except Exception as e:  # noqa: BLE001 - report, keep the other checks running
            failures.append(CheckResult(f"load:{module}", False, f"{type(e).__name__}: {e}"))
    return failures


def run_checks(names: list[str] | None = None, options: CheckOptions | None = None) -> list[CheckResult]:
    """Run ``names`` (default: all). A check module that fails to import is reported only when
    running all checks: ``--only`` asked about specific ones."""
    load_failures = load_checks()
    results = [] if names else load_failures
    options = options or CheckOptions()
    unknown = sorted(set(names or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"Unknown check(s) {', '.join(unknown)}; available: {', '.join(CHECKS)}")
    for name in names or list(CHECKS):
        fn = CHECKS[name]
        try:
            results.append(fn(options) if inspect.signature(fn).parameters else fn())
        except Exception as e:  # noqa: BLE001 - a broken check is a failed check, never a crash
            results.append(CheckResult(name, False, f"{type(e).__name__}: {e}"))
    return results


# ---------------------------------------------------------------------------------- api


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it (requests -> urllib3 -> socket/ssl), outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        linked = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo += [x for x in linked if isinstance(x, BaseException)]
    return seen


def classify_connection_error(exc: BaseException, url: str) -> tuple[str, str]:
    """(what failed, hint) for a failed HTTPS request: DNS, refused, timeout, proxy or TLS."""
    import requests

    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    host = url.split("://", 1)[-1].split("/", 1)[0]
    if isinstance(exc, requests.exceptions.ProxyError):
        return "proxy failed", "check HTTPS_PROXY/NO_PROXY: the proxy refused or cannot reach the plane"
    if isinstance(exc, requests.exceptions.SSLError) or any(isinstance(e, ssl.SSLError) for e in chain):
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            reason = text[text.find("certificate verify failed") :].split(")")[0] if "verify failed" in text else ""
            return (
                f"TLS verification failed ({reason or 'untrusted certificate'})",
                "set [remote_execution] ca_bundle to the CA that signed the plane's certificate "
                "(or REQUESTS_CA_BUNDLE); the certificate must name the host in api_url",
            )
        if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            return "TLS handshake failed (the server does not speak TLS)", "api_url says https: is the port plain HTTP?"
        return (
            "TLS handshake failed",
            "if the plane requires a client certificate, set [remote_execution] client_cert and client_key",
        )
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolution" in text or "Name or service" in text:
        return (
            f"DNS lookup of {host.rsplit(':', 1)[0]} failed",
            "check the host name in [remote_execution] api_url and DNS",
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return (
            f"connection to {host} timed out",
            "a firewall may drop outbound traffic: allow HTTPS egress (or set HTTPS_PROXY)",
        )
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in text:
        return (
            f"connection to {host} refused",
            "nothing listens there: check the port in api_url and that the api-server runs",
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return (
            f"no answer from {host} in time",
            "the plane or a proxy is overloaded; raise [remote_execution] request_timeout",
        )
    return f"{type(exc).__name__}", "check [remote_execution] api_url and the network path to the plane"


@check("api")
def check_api() -> CheckResult:
    """The Remote Execution API answers at api_url, over TLS verified with the agent's CA bundle."""
    import requests

    from airflow_remote_execution import config

    api_url = config.get("api_url").rstrip("/")
    if not api_url.startswith(("http://", "https://")):
        return CheckResult(
            "api", False, f"api_url {api_url!r} is not a URL", "set [remote_execution] api_url=https://..."
        )
    ca_bundle, client_cert, client_key = config.get("ca_bundle"), config.get("client_cert"), config.get("client_key")
    for option, path in (("ca_bundle", ca_bundle), ("client_cert", client_cert), ("client_key", client_key)):
        if path and not Path(path).expanduser().is_file():
            return CheckResult(
                "api", False, f"{option} {path} is not a readable file", f"fix [remote_execution] {option}"
            )
    url = api_url + config.API_V1 + "/agents/me"
    started = time.monotonic()
    try:
        response = requests.get(
            url,
            timeout=min(config.getfloat("request_timeout"), 15.0),
            verify=ca_bundle or True,
            cert=(client_cert, client_key) if client_cert and client_key else client_cert or None,
        )
    except requests.RequestException as e:
        what, hint = classify_connection_error(e, api_url)
        return CheckResult("api", False, f"{api_url}: {what}", hint)
    ms = (time.monotonic() - started) * 1000
    if response.status_code == 404:
        return CheckResult(
            "api",
            False,
            f"{api_url} answers, but has no Remote Execution API (404 on {config.API_V1})",
            "api_url must be the plane's api-server base URL with the provider installed "
            "([remote_execution] api_enabled) and the proxy passing /remote_execution/",
        )
    if response.status_code != 401 or "detail" not in response.text:
        return CheckResult(
            "api",
            False,
            f"{url} answered HTTP {response.status_code}, not the Remote Execution API",
            "a proxy or another service answers at api_url; check the URL and the proxy routes",
        )
    trusted = ca_bundle or "the system CA store (or REQUESTS_CA_BUNDLE)"
    tls = "plain HTTP" if api_url.startswith("http://") else f"TLS verified with {trusted}"
    detail = f"{api_url} reachable in {ms:.0f} ms, {tls}" + (", client certificate sent" if client_cert else "")
    # Tasks talk to Airflow's execution API, not to ours: a proxy that passes only /remote_execution breaks them.
    execution_url = config.execution_api_url().rstrip("/") + "/health"
    try:
        health = requests.get(
            execution_url,
            timeout=min(config.getfloat("request_timeout"), 15.0),
            verify=ca_bundle or True,
            cert=(client_cert, client_key) if client_cert and client_key else client_cert or None,
        )
        healthy = health.status_code == 200 and health.json().get("status") == "healthy"
        problem = f"answered HTTP {health.status_code}"
    except (requests.RequestException, ValueError) as e:
        healthy, problem = False, classify_connection_error(e, execution_url)[0] if isinstance(e, OSError) else str(e)
    if not healthy:
        return CheckResult(
            "api",
            False,
            f"{detail}; but the execution API at {execution_url} {problem}",
            "tasks reach the plane's execution API at [remote_execution] execution_api_url (default "
            "<api_url>/execution/): let the proxy pass /execution/ or set execution_api_url",
        )
    detail += ", execution API healthy"
    if api_url.startswith("http://"):
        loopback = api_url.split("://", 1)[1].startswith(("127.", "localhost", "[::1]"))
        return CheckResult(
            "api",
            loopback,
            detail + ("" if loopback else ": the token would cross the network in clear text"),
            "use https:// for api_url",
            warning=loopback,
        )
    return CheckResult("api", True, detail)


# ---------------------------------------------------------------------------------- token and clock


def _whoami():
    """(answer, local clock midpoint, round trip) of ``GET /agents/me``, or raise PlaneError/SystemExit."""
    from airflow_remote_execution.agent.client import PlaneClient

    client = PlaneClient.from_config()
    client.http.adapters["https://"].max_retries.total = 0  # the doctor reports, it does not wait out retries
    client.http.adapters["http://"].max_retries.total = 0
    before = time.time()
    answer = client.whoami()
    after = time.time()
    return answer, (before + after) / 2, after - before


def _plane_call(name: str):
    """Run ``_whoami``; on failure, the CheckResult to return instead."""
    from airflow_remote_execution.agent.client import PlaneError

    try:
        return _whoami(), None
    except SystemExit as e:  # no token configured: config.agent_token() says what to set
        if name != "token":
            return None, CheckResult(name, False, "no agent token (see the token check)", skipped=True)
        return None, CheckResult(name, False, str(e), "set [remote_execution] token_file")
    except PlaneError as e:
        if e.status == 0:
            return None, CheckResult(
                name, False, "plane not reachable (see the api check)", "fix the api check first", skipped=True
            )
        if e.status == 401:
            return None, CheckResult(
                name,
                False,
                f"token rejected: {e.detail}",
                "create a token on the plane (`airflow remote-execution tokens create --name <agent> --queues ...`) "
                "and put it in [remote_execution] token_file",
            )
        return None, CheckResult(name, False, f"plane answered {e}", "see the api check and the plane's logs")


@check("token")
def check_token() -> CheckResult:
    """The agent token is valid; shows its agent, queues and expiry, and that configured queues fit."""
    from airflow_remote_execution import config

    got, failed = _plane_call("token")
    if failed:
        return failed
    (me, _, _) = got
    detail = f"agent {me.agent_name}, token {me.token_id}, queues {','.join(me.queues)}"
    wanted = config.split_list(config.get("queues"))
    outside = [q for q in wanted if q not in me.queues]
    if outside:
        return CheckResult(
            "token",
            False,
            detail + f"; [remote_execution] queues {','.join(outside)} not allowed by the token",
            "serve only the token's queues, or create a token with those queues",
        )
    if me.token_expires_at is None:
        return CheckResult("token", True, detail + ", no expiry")
    expires = me.token_expires_at if me.token_expires_at.tzinfo else me.token_expires_at.replace(tzinfo=timezone.utc)
    left = expires - datetime.now(timezone.utc)
    detail += f", expires {expires.isoformat(timespec='seconds')} (in {left.days} d)"
    if left.days < TOKEN_WARN_DAYS:
        return CheckResult(
            "token", True, detail, "rotate it: `airflow remote-execution tokens rotate <id>`", warning=True
        )
    return CheckResult("token", True, detail)


def clock_result(skew: float, round_trip: float) -> CheckResult:
    """Judge a measured skew (plane minus agent, seconds); the round trip bounds its error."""
    direction = "behind" if skew > 0 else "ahead of"
    detail = f"agent clock {abs(skew):.1f} s {direction} the plane (±{round_trip / 2:.2f} s)"
    hint = "sync the agent's clock (NTP/chrony); the execution API's tokens are valid only for a time window"
    if abs(skew) - round_trip / 2 > CLOCK_FAIL_SECONDS:
        return CheckResult("clock", False, detail, hint)
    if abs(skew) - round_trip / 2 > CLOCK_WARN_SECONDS:
        return CheckResult("clock", True, detail, hint, warning=True)
    return CheckResult("clock", True, detail)


@check("clock")
def check_clock() -> CheckResult:
    got, failed = _plane_call("clock")
    if failed:
        return failed
    me, local_mid, round_trip = got
    server = me.server_time if me.server_time.tzinfo else me.server_time.replace(tzinfo=timezone.utc)
    return clock_result(server.timestamp() - local_mid, round_trip)


# ---------------------------------------------------------------------------------- secrets

_AUTH_WORDS = (
    "Forbidden",
    "Unauthorized",
    "AccessDenied",
    "Authentication",
    "PermissionDenied",
    "Unauthenticated",
    "InvalidRequest",
    "Credential",
    "UnrecognizedClient",
    "InvalidClientTokenId",
    "permission denied",
)


def secrets_backend_class() -> str:
    """The worker secrets backend class the Task SDK will use (``[workers]``, else ``[secrets]``)."""
    from airflow.configuration import conf

    return (conf.get("workers", "secrets_backend", fallback="") or conf.get("secrets", "backend", fallback="")).strip()


def _secrets_failure(backend: str, what: str, exc: Exception) -> CheckResult:
    text = f"{type(exc).__name__}: {exc}"
    short = text if len(text) < 300 else text[:300] + "..."
    if any(word.lower() in text.lower() for word in _AUTH_WORDS):
        hint = "the backend refused the agent's credentials: check the auth settings in secrets_backend_kwargs"
    elif any(word in text for word in ("Connect", "connect", "resolve", "Timeout", "timed out", "SSL", "Unavailable")):
        hint = (
            "cannot reach the secrets backend: check its URL/endpoint in [workers] secrets_backend_kwargs, "
            "DNS, egress and CA settings"
        )
    else:
        hint = "see `airflow remote-execution secrets configure --help` and the backend's documentation"
    return CheckResult("secrets", False, f"{backend.rsplit('.', 1)[-1]}: {what} failed: {short}", hint)


@check("secrets")
def check_secrets(options: CheckOptions) -> CheckResult:
    """The configured worker secrets backend loads, answers, and resolves the probe connection/variable."""
    backend_path = secrets_backend_class()
    if not backend_path:
        return CheckResult(
            "secrets",
            True,
            "no [workers] secrets_backend: tasks read connections and variables from env vars, then the plane",
            skipped=True,
        )
    name = backend_path.rsplit(".", 1)[-1]
    try:
        from airflow.sdk.configuration import get_custom_secret_backend

        backend = get_custom_secret_backend(worker_mode=True)
    except Exception as e:  # noqa: BLE001 - import errors, bad kwargs, missing credentials
        text = f"{type(e).__name__}: {e}"
        provider = next((p for key, p in _PROVIDERS.items() if key in backend_path), "")
        hint = (
            f"install {provider}"
            if isinstance(e, ImportError) and provider
            else "check [workers] secrets_backend_kwargs"
        )
        return CheckResult("secrets", False, f"cannot load {backend_path}: {text[:300]}", hint)
    notes = []
    probes = [("connection", options.probe_conn), ("variable", options.probe_var)]
    if not options.probe_conn and not options.probe_var:
        probes = [("variable", PROBE_NAME)]
    for kind, key in probes:
        if not key:
            continue
        try:
            if kind == "connection":
                found = backend.get_connection(conn_id=key)
                summary = f"found (conn_type {found.conn_type})" if found else None
            else:
                found = backend.get_variable(key=key)
                summary = "found" if found is not None else None
        except Exception as e:  # noqa: BLE001 - the lookup's error is the finding
            return _secrets_failure(backend_path, f"{kind} {key!r} lookup", e)
        if key == PROBE_NAME:
            notes.append("answered a probe lookup" + (" (found)" if summary else ""))
        else:
            notes.append(
                f"{kind} {key!r} "
                + (summary or "not found in the backend (tasks fall back to env vars, then the plane)")
            )
    return CheckResult("secrets", True, f"{name}: " + "; ".join(notes))


_PROVIDERS = {
    "providers.amazon": "apache-airflow-providers-amazon",
    "providers.microsoft.azure": "apache-airflow-providers-microsoft-azure",
    "providers.google": "apache-airflow-providers-google",
    "providers.hashicorp": "apache-airflow-providers-hashicorp",
}


# ---------------------------------------------------------------------------------- disk


def disk_paths() -> dict[str, Path]:
    """Where the agent writes: AIRFLOW_HOME and the task log folder."""
    from airflow.configuration import AIRFLOW_HOME, conf

    paths = {"AIRFLOW_HOME": Path(AIRFLOW_HOME)}
    log_folder = conf.get("logging", "base_log_folder", fallback="")
    if log_folder:
        paths["base_log_folder"] = Path(log_folder)
    return paths


def disk_result(free: dict[str, tuple[Path, int]]) -> CheckResult:
    parts = [f"{label} {path}: {size / (1 << 30):.1f} GiB free" for label, (path, size) in free.items()]
    low = min(size for _, size in free.values())
    hint = "free space there (old task logs?) or move base_log_folder to a larger volume"
    if low < DISK_FAIL_BYTES:
        return CheckResult("disk", False, "; ".join(parts), hint)
    return CheckResult(
        "disk", True, "; ".join(parts), hint if low < DISK_WARN_BYTES else "", warning=low < DISK_WARN_BYTES
    )


@check("disk")
def check_disk() -> CheckResult:
    free = {}
    for label, path in disk_paths().items():
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        free[label] = (path, shutil.disk_usage(existing).free)
    return disk_result(free)

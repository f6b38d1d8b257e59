"""
What the Remote Execution API admits before any route runs, for the routes agents call (``/v1/...``
but not ``/v1/admin`` or the UI's, which use Airflow's own auth):

* **authentication on headers alone**: the bearer token is verified before a byte of the body is read,
  so an unauthenticated 100 MB body costs nothing. Verified tokens are remembered (plane/identity.py:
  revocation still takes effect within a second everywhere) and handed to the routes as
  ``request.state.rex_identity``, so an idle agent's heartbeats and long-polls read no token row;
* **bounded bodies**: a body over ``[remote_execution] max_body_size`` (``max_parsing_result_size`` for
  ``/v1/parsing/results``) is a 413 naming the limit, and reading stops there;
* **failed-authentication throttle**: a client address with ``auth_failure_limit`` failures within a
  minute is answered 429 with ``Retry-After`` until the minute has passed, without a database read,
  except for tokens that authenticated within the last :data:`KNOWN_FOR` seconds (other agents behind
  the same NAT keep working while one of them has a wrong token).

State is per api-server process (each worker and host counts for itself).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_remote_execution import config
from airflow_remote_execution.plane import metrics

KNOWN_FOR = 300.0
FAILURE_WINDOW = 60.0
_AGENT_ROUTES = re.compile(r"^/v1/(?!admin(/|$))")
PARSING_RESULTS = "/v1/parsing/results"


class BodyTooLarge(Exception):
    pass


def _answer(status: int, detail: str, headers: dict[str, str] | None = None):
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def send_to(send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return send_to


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


class Admission:
    """ASGI middleware of the Remote Execution API app: see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._verified: dict[bytes, float] = {}
        self._failures: dict[str, deque[float]] = {}
        self._served = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if not _AGENT_ROUTES.match(path):
            await self.app(scope, receive, send)
            return
        if not self._served:  # what the api-server loaded after our app, out of full collections too
            from airflow_remote_execution.plane import gc_tuning

            self._served = True
            gc_tuning.freeze_startup_heap()
        client = (scope.get("client") or ("?", 0))[0]
        authorization = _header(scope, b"authorization")
        key = hashlib.sha256((authorization or "").encode()).digest()
        if (retry_after := self._throttled(client)) and not self._known(key):
            metrics.auth_failed("", throttled=True)
            await _answer(
                429,
                f"Too many failed authentications from {client} ({config.getint('auth_failure_limit')} within "
                f"{FAILURE_WINDOW:.0f} s): retry after {retry_after} s with a valid agent token "
                "([remote_execution] token_file)",
                {"Retry-After": str(retry_after)},
            )(send)
            return
        if not await self._authenticated(scope, authorization, key, client, send):
            return
        limit_key = "max_parsing_result_size" if path == PARSING_RESULTS else "max_body_size"
        limit = config.getint(limit_key)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(413, _too_large(int(declared), limit, limit_key))(send)
            return
        try:
            body = await _read_body(receive, limit)
        except BodyTooLarge:
            await _answer(413, _too_large(None, limit, limit_key))(send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _known(self, key: bytes) -> bool:
        return time.monotonic() - self._verified.get(key, float("-inf")) < KNOWN_FOR

    async def _authenticated(self, scope: Scope, authorization: str | None, key: bytes, client: str, send: Send) -> bool:
        from airflow_remote_execution.plane.api.db_threads import in_db_thread
        from airflow_remote_execution.plane.identity import identities
        from airflow_remote_execution.plane.tokens import TokenError

        now = time.monotonic()
        who = identities.cached(authorization)
        if who is None:
            try:
                who = await in_db_thread(identities.resolve, authorization)
            except TokenError as e:
                self._failed(client, now)
                metrics.auth_failed(str(e))
                await _answer(401, str(e), {"WWW-Authenticate": "Bearer"})(send)
                return False
        scope.setdefault("state", {})["rex_identity"] = who
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified[key] = now
        return True

    def _failed(self, client: str, now: float) -> None:
        failures = self._failures.setdefault(client, deque())
        failures.append(now)
        while failures and now - failures[0] > FAILURE_WINDOW:
            failures.popleft()
        if len(self._failures) > 100_000:
            self._failures.clear()

    def _throttled(self, client: str) -> int:
        """Seconds until ``client`` may try again; 0 if it may now."""
        failures = self._failures.get(client)
        if not failures:
            return 0
        now = time.monotonic()
        while failures and now - failures[0] > FAILURE_WINDOW:
            failures.popleft()
        if len(failures) < config.getint("auth_failure_limit"):
            return 0
        return max(int(FAILURE_WINDOW - (now - failures[0])) + 1, 1)


def _too_large(size: int | None, limit: int, key: str) -> str:
    what = f"Request body of {size} bytes" if size is not None else "Request body"
    return f"{what} is over this route's limit of {limit} bytes ([remote_execution] {key} on the plane)"


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then http.disconnect, as the server sends it

    return replay

"""What the plugin does to the api-server's root app so that one process holds thousands of idle agents.

* **A fast path for agents' idle traffic.** Airflow wraps every request in its access log, gzip, JWT
  cookie refresh and the auth manager's middlewares, and installs plugins' root middlewares *inside*
  them. None of that applies to the long-poll (``/v1/leases``) and the heartbeat (bearer tokens checked
  by our own ``Admission``, small JSON), yet a parked long-poll kept ~300 objects of that machinery
  alive, and at 2,000 idle agents garbage collections over them were the slowest heartbeats. A
  dispatcher in front of the root app's middleware stack hands these two paths straight to the mounted
  Remote Execution API; everything else goes through Airflow's stack as before. The access log does not
  list these two routes (the ``remote_execution.heartbeat.duration`` and ``lease.long_polls`` metrics
  cover them).
* **A long-poll waits outside the request machinery.** A lease request that has to wait hands its
  waiting to the dispatcher (:class:`Parking`) and returns; FastAPI's and Starlette's frames unwind, and
  the dispatcher waits with only the connection and the wait itself, then answers. Errors in the wait are
  answered by the Remote Execution API's own exception handlers, as if raised in the route.
* **Warm before serving.** Airflow's execution API builds its versioned routes on its first request,
  ~3 s in which the process answers nobody; that now happens before uvicorn accepts connections, and
  then the start-up heap is frozen out of garbage collections (plane/gc_tuning.py).

``RootAppHooks`` is registered as a plugin root middleware like any other; it acts on uvicorn's lifespan
start-up (before any request), or on the first request where there is no lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_remote_execution import config

log = logging.getLogger(__name__)

LEASES = f"{config.API_V1}/leases"
FAST_PATHS = (LEASES, f"{config.API_V1}/agents/heartbeat")
PARK = "remote_execution.park"  # scope key: the lease route may hand its waiting to the Parking found there

Wait = Callable[["asyncio.Future[None]"], Awaitable[BaseModel]]


class RootAppHooks:
    """A pass-through root middleware that installs the dispatcher and warms the execution API once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.done = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.done:
            await self.app(scope, receive, send)
            return
        self.done = True
        root = scope.get("app")
        if scope["type"] != "lifespan":
            install(root)
            await self.app(scope, receive, send)
            return

        async def start_then_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                install(root)
                await warm_execution_api(root)
                from airflow_remote_execution.plane import gc_tuning

                gc_tuning.freeze_startup_heap()
            await send(message)

        await self.app(scope, receive, start_then_send)


def install(root: Any) -> bool:
    """Put the dispatcher in front of ``root``'s built middleware stack; False (Airflow's stack for every
    request, as before) if the root app or our mount is not what we expect."""
    stack = getattr(root, "middleware_stack", None)
    if isinstance(stack, _Dispatcher):
        return True
    mount = next(
        (r for r in getattr(root, "routes", ()) if isinstance(r, Mount) and r.path == config.API_PREFIX), None
    )
    if stack is None or mount is None:
        log.info("Remote Execution fast path not installed: no built root app with %s", config.API_PREFIX)
        return False
    root.middleware_stack = _Dispatcher(stack, mount)
    return True


class _Dispatcher:
    def __init__(self, stack: ASGIApp, mount: Mount) -> None:
        self.stack = stack
        self.mount = mount

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(FAST_PATHS):
            match, child_scope = self.mount.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                if scope["path"].endswith(LEASES):
                    await self._lease(scope, receive, send)
                else:
                    await self.mount.handle(scope, receive, send)
                return
        await self.stack(scope, receive, send)

    async def _lease(self, scope: Scope, receive: Receive, send: Send) -> None:
        parking = scope[PARK] = Parking()

        async def send_unless_parked(message: Message) -> None:
            if parking.wait is None:
                await send(message)

        try:
            await self.mount.handle(scope, receive, send_unless_parked)
        finally:
            if parking.wait is not None:
                for key in [k for k in scope if k.startswith("fastapi_")]:  # its closed exit stacks
                    del scope[key]
                await parking.answer(scope, receive, send, self.mount.app)


class Parking:
    """Where the lease route hands over a long-poll that has to wait (``parking(wait)``, then it returns
    anything: that answer is not sent). ``wait(gone)`` is awaited here, ``gone`` done when the agent hangs
    up, and what it returns is the answer."""

    def __init__(self) -> None:
        self.wait: Wait | None = None

    def __call__(self, wait: Wait) -> None:
        self.wait = wait

    async def answer(self, scope: Scope, receive: Receive, send: Send, app: Any) -> None:
        assert self.wait is not None
        # Not cancelled when the wait ends: the server's receive() returns as soon as the answer is sent
        # (no exception, nothing for the garbage collector).
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            reply = await self.wait(gone)
            response: Response = Response(reply.model_dump_json(), media_type="application/json")
        except asyncio.CancelledError:
            gone.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - answered as the route would have been
            response = await _handled(app, scope, receive, exc)
        await response(scope, receive, send)


async def disconnected(receive: Receive) -> None:
    """Returns when the agent hangs up (its process ended, or it gave up on this request)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _handled(app: Any, scope: Scope, receive: Receive, exc: Exception) -> Response:
    """The answer the app's own exception handlers give ``exc``; a logged 500 if none takes it."""
    handlers = getattr(app, "exception_handlers", {})
    for cls in type(exc).__mro__:
        if cls in handlers:
            result = handlers[cls](Request(scope, receive), exc)
            return await result if asyncio.iscoroutine(result) else result
    log.exception("Lease request failed while waiting", exc_info=exc)
    return JSONResponse({"detail": "Internal error while waiting for work; the plane's log has it"}, 500)


async def warm_execution_api(root: Any) -> None:
    """One in-process request to Airflow's execution API (mounted at ``/execution``), so that its first
    real one (a task start) does not stall the process while it builds its routes."""
    import httpx

    from airflow_remote_execution.plane.api.task_start import execution_app

    app = execution_app({"router": getattr(root, "router", None)})
    if app is None:
        return
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://plane") as client:
            await client.get("/health")
    except Exception:  # noqa: BLE001 - a cold first task start is slower, nothing worse
        log.warning("Could not warm Airflow's execution API at start-up", exc_info=True)

"""A bounded set of threads of its own for agents' database work (see :func:`in_db_thread`)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
AGENT_DB_THREADS = 8  # threads agents' database work may hold at once, per api-server process

_threads = ThreadPoolExecutor(AGENT_DB_THREADS, thread_name_prefix="remote-execution-db")


async def in_db_thread(fn: Callable[..., T], *args) -> T:
    """Run agents' database work on one of AGENT_DB_THREADS threads kept for it; more waits here, on the event loop.

    Bounded: a registration storm or a burst of lease queries on all of the shared pool's 40 threads starved the
    heartbeat writer of the GIL (and then of time), so live agents looked silent. Kept: the shared pool ends
    threads idle for 10 s and starts new ones on demand, and starting one blocked the event loop until the new
    thread got the GIL (300 ms measured at 1,000 agents)."""
    context = contextvars.copy_context()  # as asyncio.to_thread: the request's context variables go along
    return await asyncio.get_running_loop().run_in_executor(_threads, functools.partial(context.run, fn, *args))

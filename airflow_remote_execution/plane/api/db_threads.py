"""A bounded share of the thread pool for agents' database work (see :func:`in_db_thread`)."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")
AGENT_DB_THREADS = 8  # threads agents' database work may hold at once, per api-server process


async def in_db_thread(fn: Callable[..., T], *args) -> T:
    """Run agents' database work on a thread, at most AGENT_DB_THREADS at once. A registration storm or a burst
    of lease queries on all of the thread pool's 40 threads starved the heartbeat writer of the GIL (and then
    of time), so live agents looked silent; bounded, they queue here instead, on the event loop."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(AGENT_DB_THREADS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)


_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop (tests run several)

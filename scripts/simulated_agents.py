"""
Simulated idle agents for the fleet benchmark and tests: each with its own token registers, heartbeats on
the interval the plane dictates and keeps one long-poll lease request open, as an idle agent does. One
asyncio process (aiohttp) holds thousands.
"""

from __future__ import annotations

import asyncio
import random
import resource
import statistics
import time


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def simulate(url: str, tokens: list[str], ramp: float, settle: float, duration: float) -> dict:
    """Run the simulated agents: register over ``ramp`` s, wait ``settle`` s, measure ``duration`` s."""
    import aiohttp

    api = f"{url}/remote_execution/v1"
    measuring = asyncio.Event()
    stop = asyncio.Event()
    beats: list[float] = []
    errors: dict[str, int] = {}
    lease_returns: list[float] = []
    intervals: list[float] = []

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def post(path: str, token: str, body: dict):
            async with http.post(f"{api}{path}", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status, await r.json(content_type=None)

        async def agent(i: int, token: str) -> None:
            await asyncio.sleep(ramp * i / len(tokens))
            while True:
                try:
                    status, reply = await post("/agents/register", token, {"concurrency": 1, "hostname": f"sim-{i}"})
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status, reply = 0, None
                if status == 200:
                    break
                error(f"register {status}")
                await asyncio.sleep(1)
            interval = reply["heartbeat_interval"]

            async def heartbeats() -> None:
                nonlocal interval
                await asyncio.sleep(random.uniform(0, interval))
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        status, reply = await post("/agents/heartbeat", token, {"free_slots": 1, "running": []})
                    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                        status, reply = type(e).__name__, None
                    took = (time.monotonic() - started) * 1000
                    if measuring.is_set() and not stop.is_set():
                        if status == 200:
                            beats.append(took)
                            intervals.append(reply["heartbeat_interval"])
                        else:
                            error(f"heartbeat {status}")
                    if status == 200:
                        interval = reply["heartbeat_interval"]
                    await asyncio.sleep(max(interval - took / 1000, 0))

            beating = asyncio.create_task(heartbeats())
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status, _ = await post("/leases", token, {"slots": 1, "wait": 20})
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status = type(e).__name__
                if measuring.is_set() and not stop.is_set():
                    if status == 200:
                        lease_returns.append(time.monotonic() - started)
                    else:
                        error(f"lease {status}")
                if status != 200:
                    await asyncio.sleep(1)
            beating.cancel()

        tasks = [asyncio.create_task(agent(i, t)) for i, t in enumerate(tokens)]
        await asyncio.sleep(ramp + settle)
        measuring.set()
        began = time.time()
        await asyncio.sleep(duration)
        stop.set()
        ended = time.time()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "window": [began, ended],
        "heartbeats": len(beats),
        "heartbeat_ms": {"p50": pct(beats, 0.5), "p95": pct(beats, 0.95), "p99": pct(beats, 0.99), "max": pct(beats, 1.0)},
        "heartbeat_interval_dictated_s": sorted(set(intervals)),
        "lease_requests_returned": len(lease_returns),
        "lease_request_s_median": round(statistics.median(lease_returns), 1) if lease_returns else None,
        "errors": errors,
    }

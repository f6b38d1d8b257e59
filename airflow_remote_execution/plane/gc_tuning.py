"""Garbage-collector settings for an api-server process that holds thousands of parked long-polls."""

from __future__ import annotations


def freeze_startup_heap() -> None:
    """Make Python's garbage collector cheap for a process holding thousands of parked long-polls.

    Airflow's api-server holds ~1M long-lived objects once warm (modules, ORM mappers, pydantic schemas, the
    execution API's versioned routes), and each idle agent ~150 more (its two connections and its parked
    long-poll: plane/api/root_app.py). Full collections walked all of them every second or two, 200-700 ms
    each at 1,000 agents (measured with gc callbacks), the heartbeats' slowest answers. So what is loaded at
    start is frozen out of collections (``gc.freeze``) and collections run less often
    (``gc.set_threshold``): garbage cycles are freed later, a few MB at most. Called at the end of the
    api-server's start-up (plane/api/root_app.py) and on the first agent request (what loaded lazily)."""
    import gc

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


GC_THRESHOLDS = (50_000, 20, 100)  # Python's defaults: (700, 10, 10)

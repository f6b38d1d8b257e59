#!/usr/bin/env python
"""
Cost of the fleet figures (``plane/metrics.py``): one ``snapshot()`` is what every gauge round of the
scheduler (every 5 s), every Prometheus scrape and every KEDA poll of ``/metrics/scaling`` reads.

On a throwaway PostgreSQL cluster (``scripts/localplane.PostgresCluster``) with our tables: ``--agents``
agents over ``--queues`` queues and ``--items`` work items (10 % queued, 5 % leased, 25 % running, the rest
finished and kept for ``finished_retention``). Times ``snapshot()`` and the Prometheus text over
``--rounds`` rounds. Prints one JSON document; nothing is asserted.

    .venv/bin/python bench/fleet_metrics.py [--items 200000] [--agents 500] [--queues 20] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--queues", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="rex-bench-metrics-"))
    os.chmod(base, 0o755)
    os.environ.update({"AIRFLOW_HOME": str(base / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    from localplane import PostgresCluster

    cluster = PostgresCluster(base / "pg")
    try:
        url = cluster.start()
        os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = url
        print(json.dumps(run(url, args)))
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def run(url: str, args) -> dict:
    from sqlalchemy import create_engine, insert
    from sqlalchemy.orm import Session

    from airflow.sdk import timezone

    from airflow_remote_execution.models.tables import AgentModel, WorkItemModel, metadata
    from airflow_remote_execution.plane import metrics

    engine = create_engine(url)
    metadata.create_all(engine)
    now = timezone.utcnow()
    queues = [f"queue-{q}" for q in range(args.queues)]
    with engine.begin() as conn:
        conn.execute(insert(AgentModel), [
            {"name": f"agent-{a}", "state": "active", "drained": a % 50 == 0, "queues": [queues[a % len(queues)]],
             "concurrency": 8, "free_slots": a % 9, "versions": {}, "registered_at": now, "last_heartbeat_at": now}
            for a in range(args.agents)
        ])
        states = ["queued"] * 10 + ["leased"] * 5 + ["running"] * 25 + ["success"] * 60
        batch = []
        for i in range(args.items):
            state = states[i % len(states)]
            batch.append({
                "kind": "task", "key_digest": f"{i:040x}", "key": ["ti", "d", f"t{i}", "r", -1, 1], "queue": queues[i % len(queues)],
                "priority_weight": 1, "workload": "{}", "state": state, "fence": 1, "report_pending": False,
                "agent_id": None if state == "queued" else 1 + i % args.agents,
                "queued_at": now - timedelta(seconds=i % 600),
                "finished_at": now if state == "success" else None,
            })
            if len(batch) == 10_000:
                conn.execute(insert(WorkItemModel), batch)
                batch = []
        if batch:
            conn.execute(insert(WorkItemModel), batch)
        conn.exec_driver_sql("ANALYZE")

    snapshot_ms, text_ms = [], []
    for _ in range(args.rounds):
        with Session(engine) as session:
            t0 = time.perf_counter()
            snap = metrics.snapshot(session)
            snapshot_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        text = metrics.prometheus_text(snap, 8)
        text_ms.append((time.perf_counter() - t0) * 1000)
    engine.dispose()
    return {
        "benchmark": "fleet_metrics",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load1": os.getloadavg()[0]},
        "items": args.items, "agents": args.agents, "queues": args.queues, "rounds": args.rounds,
        "snapshot_ms": {"median": round(statistics.median(snapshot_ms), 2), "max": round(max(snapshot_ms), 2)},
        "prometheus_text_ms": {"median": round(statistics.median(text_ms), 2), "max": round(max(text_ms), 2)},
        "prometheus_text_bytes": len(text),
        "queued_total": sum(f.queued for f in snap.queues.values()),
    }


if __name__ == "__main__":
    main()

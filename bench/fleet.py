#!/usr/bin/env python
"""
Fleet capacity: how many idle agents one api-server process holds, and what they cost it.

A real plane (one ``airflow api-server`` process with ``[api] workers = 1``, a scheduler and a
dag-processor, PostgreSQL, default ``[remote_execution]`` settings) and, per fleet size N, N
simulated agents, each with its own token, doing what an idle agent does: register, heartbeat on the
interval the plane dictates, and keep one long-poll lease request open. The simulator is one
asyncio process (aiohttp). Beside them one real agent runs a one-task DAG a few times during the
load: its queued -> running latency is what a user would see.

Per N it reports heartbeat latency p50/p95/p99 (round trip seen by the simulated agent), heartbeat and
lease-request errors, simulated agents the plane declared lost at any moment, api-server CPU (cores,
all its processes) and RSS, the most open PostgreSQL connections, and the real task's dispatch
latency. Then, separately, lease latency against a work-item table with a large finished history and
queued backlog (``lease_latency``): it must not grow with the history.

Prints one JSON document on stdout (progress on stderr)::

    .venv/bin/python bench/fleet.py [--agents 500,1000,2000,5000] [--duration 60] [--quick] [--out FILE]

Targets on a 2-core machine: 2,000 agents on one api-server process with heartbeat p99 < 200 ms, no
agent declared lost, real dispatch p50 < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import asyncio
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from localplane import Agent, Plane, PostgresCluster  # noqa: E402
from simulated_agents import pct, raise_fd_limit, simulate  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
TARGETS = {"agents": 2000, "heartbeat_p99_ms": 200.0, "lost": 0, "dispatch_p50_ms": 50.0}
PROBE_DAG = '''
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

with DAG("fleet_probe", schedule=None, catchup=False, max_active_runs=1) as dag:
    PythonOperator(task_id="probe", python_callable=lambda: None, do_xcom_push=False)
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the plane side


def simulator_main(args) -> None:
    raise_fd_limit()
    tokens = json.loads(Path(args.tokens).read_text())
    result = asyncio.run(simulate(args.url, tokens, args.ramp, args.settle, args.duration))
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- the plane side


def sql(plane: Plane, query: str) -> list:
    from sqlalchemy import create_engine, text

    engine = create_engine(plane.db_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query))
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def create_tokens(plane: Plane, n: int, prefix: str) -> list[str]:
    script = (
        "import json, sys\n"
        "from airflow.utils.session import create_session\n"
        "from airflow_remote_execution.plane import tokens\n"
        "with create_session() as s:\n"
        f"    out = [tokens.create(s, agent_name=f'{prefix}-{{i}}', queues=['sim'])[0] for i in range({n})]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([PYTHON, "-c", script], env=plane.env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])


def tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except Exception:  # noqa: BLE001 - a process that just ended
            pass
    return total


def probe_dispatch(plane: Plane, runs: int) -> list[float]:
    """queued -> running of the probe DAG's task on the real agent, ``runs`` times one after the other."""
    latencies = []
    for _ in range(runs):
        run_id = plane.trigger("fleet_probe")
        plane.wait_run("fleet_probe", run_id, timeout=180)
        [ti] = plane.task_instances("fleet_probe", run_id)
        if ti.get("queued_when") and ti.get("start_date"):
            queued = datetime.fromisoformat(ti["queued_when"])
            started = datetime.fromisoformat(ti["start_date"])
            latencies.append(round((started - queued).total_seconds() * 1000, 1))
    return latencies


def run_fleet(plane: Plane, n: int, duration: float, work: Path, round_no: int) -> dict:
    log(f"N={n}: creating {n} tokens")
    tokens = create_tokens(plane, n, f"sim{round_no}")
    tokens_file = work / f"tokens-{n}.json"
    tokens_file.write_text(json.dumps(tokens))
    result_file = work / f"result-{n}.json"
    ramp = max(5.0, n / 200)
    settle = 25.0  # one lengthened heartbeat interval and a long-poll turn after the last registration
    api_pid = plane.procs["api-server"].pid
    log(f"N={n}: simulating (ramp {ramp:.0f} s, settle {settle:.0f} s, measure {duration:.0f} s)")
    sim = subprocess.Popen(
        [PYTHON, __file__, "--simulate", "--url", plane.url, "--tokens", str(tokens_file), "--result", str(result_file),
         "--ramp", str(ramp), "--settle", str(settle), "--duration", str(duration)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(ramp + settle)
    cpu0, t0 = cpu_seconds(api_pid), time.monotonic()
    sim_cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in tree(sim.pid))
    lost: set[str] = set()
    max_conns = 0
    dispatch: list[float] = []
    deadline = time.monotonic() + duration
    next_probe = time.monotonic() + 5
    while time.monotonic() < deadline - 1:
        lost |= {r[0] for r in sql(plane, f"SELECT name FROM remote_agent WHERE state = 'lost' AND name LIKE 'sim{round_no}-%'")}
        max_conns = max(max_conns, sql(plane, "SELECT count(*) FROM pg_stat_activity WHERE datname = 'airflow'")[0][0])
        if time.monotonic() >= next_probe and len(dispatch) < 5:
            dispatch += probe_dispatch(plane, 1)
            next_probe = time.monotonic() + 5
        time.sleep(2)
    cpu1, t1 = cpu_seconds(api_pid), time.monotonic()
    rss = {f"{p.pid}:{p.name()}": round(p.memory_info().rss / 2**20) for p in tree(api_pid)}
    try:
        sim_cpu = sum(p.cpu_times().user + p.cpu_times().system for p in tree(sim.pid)) - sim_cpu0
    except Exception:  # noqa: BLE001
        sim_cpu = None
    sim.wait(timeout=duration + 120)
    result = json.loads(result_file.read_text())
    # The simulated agents go offline (as stopped agents do), so the next round starts from a quiet plane.
    sql(plane, f"UPDATE remote_agent SET state = 'offline' WHERE name LIKE 'sim{round_no}-%'")
    sql(plane, f"UPDATE remote_agent_token SET revoked_at = now() WHERE agent_name LIKE 'sim{round_no}-%'")
    summary = {
        "agents": n,
        **{k: result[k] for k in ("heartbeats", "heartbeat_ms", "heartbeat_interval_dictated_s", "errors",
                                  "lease_requests_returned", "lease_request_s_median")},
        "declared_lost": len(lost),
        "api_server_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
        "simulator_cpu_cores": round(sim_cpu / (t1 - t0), 2) if sim_cpu is not None else None,
        "api_server_rss_mb": rss,
        "db_connections_max": max_conns,
        "real_dispatch_ms": {"samples": dispatch, "p50": pct(dispatch, 0.5) if dispatch else None},
    }
    log(f"N={n}: {json.dumps(summary)}")
    return summary


# --------------------------------------------------------------------------- lease latency vs history


LEASE_SCRIPT = r'''
import json, statistics, sys, time
from datetime import timedelta
from sqlalchemy import text
from airflow.utils.session import create_session
from airflow_remote_execution.models import AgentModel
from airflow_remote_execution.plane import leases
from airflow.sdk import timezone

history, queued = int(sys.argv[1]), int(sys.argv[2])
with create_session() as s:
    s.execute(text("DELETE FROM remote_work_item"))
    for state, count, finished in (("success", history, True), ("queued", queued, False)):
        if count:
            s.execute(text(
                "INSERT INTO remote_work_item (kind, key, key_digest, dag_id, run_id, queue, priority_weight, workload, "
                "state, fence, report_pending, queued_at, finished_at) "
                "SELECT 'task', '[]', md5(:state || g::text), 'd', 'r', 'q', (g % 3), '{}', :state, 1, false, "
                "now(), CASE WHEN :finished THEN now() - interval '1 minute' ELSE NULL END "
                "FROM generate_series(1, :n) g"), {"state": state, "n": count, "finished": finished})
    s.execute(text("ANALYZE remote_work_item"))
    agent = s.query(AgentModel).filter(AgentModel.name == "lease-bench").one_or_none()
    if agent is None:
        agent = AgentModel(name="lease-bench", state="active", drained=False, queues=["q"], concurrency=1,
                           free_slots=1, versions={}, registered_at=timezone.utcnow())
        s.add(agent)
times = []
for _ in range(200):
    with create_session() as s:
        agent = s.query(AgentModel).filter(AgentModel.name == "lease-bench").one()
        started = time.perf_counter()
        got = leases.lease(s, agent, ["q"], 4, 30)
        times.append((time.perf_counter() - started) * 1000)
        assert len(got) == 4
        s.rollback()
with create_session() as s:
    started = time.perf_counter()
    leases.purge_finished(s, timedelta(days=1))  # nothing is that old: the steady state of the purge
    purge_ms = (time.perf_counter() - started) * 1000
    plan = "\n".join(r[0] for r in s.execute(text(
        "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM remote_work_item WHERE state = 'queued' AND queue IN ('q') "
        "ORDER BY priority_weight DESC, id LIMIT 4 FOR UPDATE SKIP LOCKED")))
times.sort()
print(json.dumps({"finished_rows": history, "queued_rows": queued,
                  "lease_ms": {"p50": round(times[100], 2), "p99": round(times[197], 2)},
                  "purge_noop_ms": round(purge_ms, 1), "plan": plan}))
'''


def lease_latency(plane: Plane, shapes: list[tuple[int, int]]) -> list[dict]:
    out = []
    for history, queued in shapes:
        log(f"lease latency: {history} finished, {queued} queued")
        result = subprocess.run([PYTHON, "-c", LEASE_SCRIPT, str(history), str(queued)], env=plane.env,
                                capture_output=True, text=True, timeout=1200)
        if result.returncode:
            raise RuntimeError(result.stderr[-3000:])
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["index_used"] = "idx_remote_work_item_lease" in row["plan"]
        row["plan"] = [line.strip() for line in row["plan"].splitlines()][:8]
        out.append(row)
        log(f"  {json.dumps({k: v for k, v in row.items() if k != 'plan'})}")
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="500,1000,2000,5000")
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--quick", action="store_true", help="100 and 300 agents for 20 s; small lease tables")
    parser.add_argument("--no-lease", action="store_true", help="skip the lease-latency part")
    parser.add_argument("--out")
    parser.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    for name in ("url", "tokens", "result"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("ramp", "settle"):
        parser.add_argument(f"--{name}", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate:
        simulator_main(args)
        return
    sizes = [100, 300] if args.quick else [int(x) for x in args.agents.split(",")]
    duration = 20 if args.quick else args.duration
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="rex-fleet-"))
    work.chmod(0o755)  # the PostgreSQL server runs as user postgres
    dags = work / "dags"
    dags.mkdir()
    (dags / "fleet_probe.py").write_text(PROBE_DAG)
    pg = PostgresCluster(work / "pg")
    plane = agent = None
    report: dict = {"benchmark": "fleet", "machine": {"cpus": os.cpu_count()}, "targets": TARGETS}
    try:
        db_url = pg.start()
        plane = Plane(work / "plane", db_url=db_url, dags_folder=dags, extra_env={
            "AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "5",  # the default, stated
        }).start()
        agent = Agent("real", work / "agent", plane.url, plane.create_agent_token("real", "default"),
                      concurrency=4, dags_folder=dags).start()
        agent.wait_registered()
        plane.wait_dag("fleet_probe")
        probe_dispatch(plane, 1)  # warm-up
        report["fleet"] = [run_fleet(plane, n, duration, work, i) for i, n in enumerate(sizes)]
        if not args.no_lease:
            shapes = [(10_000, 1_000), (100_000, 10_000)] if args.quick else [
                (0, 10_000), (1_000_000, 10_000), (1_000_000, 100_000)]
            report["lease_latency"] = lease_latency(plane, shapes)
    finally:
        if agent is not None:
            agent.stop()
        if plane is not None:
            plane.stop()
        pg.stop()
    at_target = next((r for r in report.get("fleet", []) if r["agents"] == TARGETS["agents"]), None)
    if at_target:
        report["meets_targets"] = bool(
            at_target["heartbeat_ms"]["p99"] is not None
            and at_target["heartbeat_ms"]["p99"] < TARGETS["heartbeat_p99_ms"]
            and at_target["declared_lost"] == 0
            and at_target["real_dispatch_ms"]["p50"] is not None
            and at_target["real_dispatch_ms"]["p50"] < TARGETS["dispatch_p50_ms"]
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

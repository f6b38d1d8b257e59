#!/usr/bin/env python
"""
Dispatch latency and chain wall time: RemoteExecutor (one agent) vs LocalExecutor, same run.

Each executor gets its own real plane (api-server, scheduler, dag-processor from
``scripts/localplane.py``) in a fresh AIRFLOW_HOME and database; the planes run one after the
other. For each executor the benchmark runs a short warm-up chain (not measured), then
``--runs`` runs of a ``--length``-task linear chain of trivial Python tasks. Defaults: 2 runs of
100 tasks = 200 dispatch samples and 2 chain wall times per executor. In a chain exactly one task
is queued at a time, after its predecessor ended, so ``start_date - queued_dttm`` measures dispatch
to an idle slot, not waiting for one. (Agent slots can still all be held by supervisors of tasks
that already ended; such samples are flagged and reported apart.) See bench/README.md for the
exact definitions.

Prints one JSON document on stdout at the end (progress goes to stderr)::

    .venv/bin/python bench/dispatch.py [--quick] [--db sqlite|postgres] [--agent-rtt-ms MS] [--out FILE]

``--agent-rtt-ms`` puts a delaying TCP proxy between the agent and the plane: a WAN, as agents have.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from localplane import Agent, Plane, PostgresCluster, fresh_pg_database  # noqa: E402

BENCH_DAGS = Path(__file__).resolve().parent / "dags"
REMOTE = "airflow_remote_execution.executors.RemoteExecutor"
LOCAL = "LocalExecutor"
WARMUP_DAG, CHAIN_DAG = "bench_warmup", "bench_chain"
TARGETS = {"dispatch_p50_ms": 20.0, "dispatch_p99_ms": 100.0, "chain_ratio_remote_over_local": 1.10}
# Identical for both planes (on top of the harness defaults, which are identical too).
COMMON_ENV = {
    "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "60",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def ms(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds() * 1000.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary(values: list[float | None]) -> dict:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"n": 0}
    r = lambda x: round(x, 1)  # noqa: E731
    return {
        "n": len(vals),
        "p50": r(percentile(vals, 0.50)),
        "p95": r(percentile(vals, 0.95)),
        "p99": r(percentile(vals, 0.99)),
        "mean": r(statistics.fmean(vals)),
        "min": r(vals[0]),
        "max": r(vals[-1]),
    }


# --------------------------------------------------------------------------- a WAN between agent and plane


class DelayProxy:
    """A loopback TCP proxy that delays every byte by ``rtt_ms / 2`` each way: the agent's side of a WAN
    (the plane's own processes keep talking to each other directly)."""

    def __init__(self, upstream_port: int, rtt_ms: float) -> None:
        import asyncio
        import threading

        self.delay = rtt_ms / 2000.0
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def serve() -> None:
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self.loop.run_forever, name="delay-proxy", daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        ready.wait(10)

    async def _connection(self, reader, writer) -> None:
        import asyncio

        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src, dst) -> None:
            while data := await src.read(65536):
                self.loop.call_later(self.delay, dst.write, data)  # same delay for all: order is kept
            await asyncio.sleep(self.delay)
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- one run


def collect_run(plane: Plane, dag_id: str, run_id: str, length: int, remote: bool) -> dict:
    """Per-task timings of one finished chain run, from the metadata (REST) and the work items."""
    run = plane.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
    tis = {t["task_id"]: t for t in plane.task_instances(dag_id, run_id)}
    items = {}
    if remote:
        for w in plane.work_items(dag_id=dag_id, run_id=run_id, limit=10_000):
            items[(w["key"][2], w["key"][4], w["key"][5])] = w
    run_start, run_end = ts(run["start_date"]), ts(run["end_date"])
    tasks = []
    prev_end = run_start
    for i in range(1, length + 1):
        ti = tis[f"t{i}"]
        sched, queued, start, end = ts(ti["scheduled_when"]), ts(ti["queued_when"]), ts(ti["start_date"]), ts(ti["end_date"])
        row = {
            "task_id": ti["task_id"],
            "state": ti["state"],
            # the dispatch figure: TI queued (scheduler) -> TI started (supervisor on the worker/agent)
            "dispatch_ms": ms(start, queued),
            # chain decomposition: previous task ended -> scheduled -> queued -> started -> ended
            "react_ms": ms(sched, prev_end),
            "sched_to_queued_ms": ms(queued, sched),
            "run_ms": ms(end, start),
            "queued_to_end_ms": ms(end, queued),  # dispatch + run: independent of where start_date is stamped
        }
        if remote:
            w = items.get((ti["task_id"], ti["map_index"], ti["try_number"]))
            if w:
                q_at, l_at, s_at = ts(w["queued_at"]), ts(w["leased_at"]), ts(w["started_at"])
                row.update(
                    plane_dispatch_ms=ms(s_at, q_at),  # work item queued -> agent confirmed the start
                    ti_queued_to_item_queued_ms=ms(q_at, queued),
                    item_queued_to_leased_ms=ms(l_at, q_at),  # commit + wake-up + lease transaction
                    leased_to_ti_start_ms=ms(start, l_at),  # lease reply -> agent, which stamps as it asks
                    ti_start_to_confirmed_ms=ms(s_at, start),  # its POST /start -> the plane's confirmation
                    agent=w["agent_name"],
                    _queued_at=w["queued_at"],
                    _work_id=w["id"],
                )
        tasks.append(row)
        prev_end = end
    return {
        "run_id": run_id,
        "state": run["state"],
        "wall_s": round((run_end - run_start).total_seconds(), 3),
        "tail_ms": ms(run_end, prev_end),  # last task ended -> dag run marked finished
        "tasks": tasks,
    }


# --------------------------------------------------------------------------- one executor


def bench_executor(name: str, executor: str, args, base: Path, dags: Path, pg_server: str | None) -> dict:
    remote = executor == REMOTE
    db_url = fresh_pg_database(pg_server, f"bench_{name.lower()}") if pg_server else None
    plane = Plane(base / name / "plane", db_url=db_url, executor=executor, dags_folder=dags, extra_env={**COMMON_ENV, **args.plane_env})
    agent: Agent | None = None
    try:
        t0 = time.monotonic()
        log(f"{name}: starting plane ({executor}, {'postgres' if pg_server else 'sqlite'})")
        plane.start()
        if remote:
            token = plane.create_agent_token("bench-agent", "default")
            api_url = DelayProxy(plane.port, args.agent_rtt_ms).url if args.agent_rtt_ms else plane.url
            agent = Agent("bench-agent", base / name / "agent", api_url, token, concurrency=args.concurrency, dags_folder=dags, extra_env=args.agent_env)
            agent.start()
            agent.wait_registered()
        plane.wait_dag(CHAIN_DAG, timeout=240)
        plane.wait_dag(WARMUP_DAG, timeout=240)
        log(f"{name}: plane ready in {time.monotonic() - t0:.0f}s; warm-up run")
        warm = plane.trigger(WARMUP_DAG)
        if plane.wait_run(WARMUP_DAG, warm, timeout=300) != "success":
            raise RuntimeError(f"warm-up run {warm} did not succeed")
        time.sleep(2)  # let the plane settle (executor events, agent slot release) before measuring
        runs = []
        load_start = os.getloadavg()
        for i in range(args.runs):
            run_id = plane.trigger(CHAIN_DAG)
            t_run = time.monotonic()
            state = plane.wait_run(CHAIN_DAG, run_id, timeout=60 + 15 * args.length)
            data = collect_run(plane, CHAIN_DAG, run_id, args.length, remote)
            log(f"{name}: run {i + 1}/{args.runs} {state}: wall {data['wall_s']:.1f}s (observed {time.monotonic() - t_run:.1f}s)")
            if state != "success":
                raise RuntimeError(f"{CHAIN_DAG} run {run_id} ended {state}")
            runs.append(data)
            time.sleep(2)
        if remote:
            mark_busy_agent(runs, plane.work_items(limit=10_000), args.concurrency)
        result = summarize(name, executor, runs, remote, args)
        result["settings"] = _settings(plane.env, agent.env if agent else None, args)
        # Other processes on the host skew the figures: the 1-minute load before and after measuring.
        result["loadavg_1m"] = {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}
        return result
    except BaseException:
        for proc in [*plane.procs.values(), *([agent.proc] if agent and agent.proc else [])]:
            log(f"--- {proc.name} (last lines)\n{proc.tail(40)}")
        raise
    finally:
        if agent:
            agent.stop()
        plane.stop()


_SETTING_PREFIXES = ("AIRFLOW__SCHEDULER__", "AIRFLOW__REMOTE_EXECUTION__", "AIRFLOW__DAG_PROCESSOR__", "AIRFLOW__WORKERS__")
_SETTING_KEYS = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__API__WORKERS")


def _settings(plane_env: dict, agent_env: dict | None, args) -> dict:
    """The performance-relevant settings each component ran with (no secrets)."""
    extra = {*args.plane_env, *args.agent_env}
    pick = lambda env: {  # noqa: E731
        k: v for k, v in sorted(env.items())
        if (k in _SETTING_KEYS or k in extra or k.startswith(_SETTING_PREFIXES)) and "TOKEN" not in k
    }
    out = {"plane": pick(plane_env)}
    if agent_env is not None:
        out["agent"] = pick(agent_env)
    return out


def mark_busy_agent(runs: list[dict], items: list[dict], concurrency: int) -> None:
    """
    Flag samples queued while every agent slot was taken. An agent slot is held from the lease
    until the agent reports the outcome, i.e. until the task's supervisor process has exited, which
    can be seconds after the task instance itself ended; such a sample measures slot waiting, not
    dispatch, and is reported separately.
    """
    spans = [(ts(w["leased_at"]), ts(w["finished_at"]), w["id"]) for w in items if w["leased_at"]]
    for run in runs:
        for t in run["tasks"]:
            q = ts(t.pop("_queued_at", None))
            me = t.pop("_work_id", None)
            if q is None:
                continue
            busy = sum(1 for leased, finished, wid in spans if wid != me and leased <= q and (finished is None or finished > q))
            t["agent_slots_busy_at_queue"] = busy
            t["agent_busy"] = busy >= concurrency


def summarize(name: str, executor: str, runs: list[dict], remote: bool, args) -> dict:
    tasks = [t for r in runs for t in r["tasks"]]
    col = lambda key, only=None: [t.get(key) for t in (only if only is not None else tasks)]  # noqa: E731
    total = lambda key: sum(v for v in col(key) if v is not None)  # noqa: E731
    out = {
        "executor": executor,
        "dispatch_ms": {
            "definition": "TI start_date - queued_dttm, every task of every chain run (one task queued at a time)",
            **summary(col("dispatch_ms")),
        },
    }
    if remote:
        idle = [t for t in tasks if not t.get("agent_busy")]
        busy = len(tasks) - len(idle)
        out["dispatch_ms_idle_agent"] = {
            "definition": "as dispatch_ms, only tasks queued while the agent had a free slot",
            "excluded_agent_busy": busy,
            **summary(col("dispatch_ms", idle)),
        }
        out["plane_dispatch_ms"] = {
            "definition": "work item started_at - queued_at (until the agent confirmed the start)",
            **summary(col("plane_dispatch_ms")),
        }
        out["plane_dispatch_ms_idle_agent"] = {
            "definition": "as plane_dispatch_ms, only tasks queued while the agent had a free slot",
            "excluded_agent_busy": busy,
            **summary(col("plane_dispatch_ms", idle)),
        }
        out["remote_breakdown_ms_idle_agent"] = {
            "ti_queued_to_item_queued": summary(col("ti_queued_to_item_queued_ms", idle)),
            "item_queued_to_leased": summary(col("item_queued_to_leased_ms", idle)),
            "leased_to_ti_start": summary(col("leased_to_ti_start_ms", idle)),
            "ti_start_to_confirmed": summary(col("ti_start_to_confirmed_ms", idle)),
        }
        out["agent_slots_busy_at_queue"] = {
            str(k): sum(1 for t in tasks if t.get("agent_slots_busy_at_queue") == k)
            for k in sorted({t.get("agent_slots_busy_at_queue") for t in tasks if t.get("agent_slots_busy_at_queue") is not None})
        }
        out["agents"] = sorted({t.get("agent") for t in tasks if t.get("agent")})
    walls = [r["wall_s"] for r in runs]
    n = len(tasks)
    out["chain"] = {
        "length": args.length,
        "runs": len(runs),
        "wall_s": walls,
        "wall_s_mean": round(statistics.fmean(walls), 3),
        "wall_s_min": min(walls),
        # Where a chain's wall time goes, mean per task (ms); react + sched_to_queued + dispatch + run
        # summed over the tasks, plus the tail, equals the wall time.
        "per_task_mean_ms": {
            "react (prev end -> scheduled)": round(total("react_ms") / n, 1),
            "scheduled -> queued": round(total("sched_to_queued_ms") / n, 1),
            "dispatch (queued -> start)": round(total("dispatch_ms") / n, 1),
            "run (start -> end)": round(total("run_ms") / n, 1),
            "total": round(sum(walls) * 1000 / n, 1),
        },
        "tail_ms_mean": round(statistics.fmean(r["tail_ms"] for r in runs), 1),
        "react_ms": summary(col("react_ms")),
        "run_ms": summary(col("run_ms")),
        "queued_to_end_ms": summary(col("queued_to_end_ms")),
    }
    if args.samples:
        out["samples"] = runs
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite", help="metadata database of each plane")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run of a 10-task chain per executor")
    p.add_argument("--length", type=int, default=None, help="chain length (default 100, --quick 10)")
    p.add_argument("--runs", type=int, default=None, help="chain runs per executor (default 2, --quick 1)")
    p.add_argument("--concurrency", type=int, default=4, help="agent slots (default 4)")
    p.add_argument("--executors", default="remote,local", help="which to run, in order (default remote,local)")
    p.add_argument("--plane-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for BOTH planes (repeatable)")
    p.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for the agent (repeatable)")
    p.add_argument("--agent-rtt-ms", type=float, default=0, help="round trip added between the agent and the plane (a WAN; default 0)")
    p.add_argument("--samples", action="store_true", help="include per-task samples in the JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    p.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = p.parse_args()
    args.length = args.length or (10 if args.quick else 100)
    args.runs = args.runs or (1 if args.quick else 2)
    args.plane_env = dict(kv.split("=", 1) for kv in args.plane_env)
    args.agent_env = dict(kv.split("=", 1) for kv in args.agent_env)
    wanted = [e.strip().lower() for e in args.executors.split(",") if e.strip()]
    if not wanted or set(wanted) - {"remote", "local"}:
        p.error("--executors takes remote and/or local")

    # SIGTERM/SIGHUP unwind through the finally blocks, so no process is left behind.
    def _stop(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)

    base = Path(tempfile.mkdtemp(prefix="rex-bench-"))
    os.chmod(base, 0o755)  # the postgres user (when running as root) must reach the cluster dir
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(BENCH_DAGS / "bench_chain.py", dags)
    (dags / "bench_chains.json").write_text(json.dumps({WARMUP_DAG: 3, CHAIN_DAG: args.length}))
    log(f"work dir {base}")

    cluster: PostgresCluster | None = None
    started = time.monotonic()
    load_before = os.getloadavg()
    git_state = _git_state()  # before the planes import the product code
    results: dict[str, dict] = {}
    try:
        pg_server = None
        if args.db == "postgres":
            cluster = PostgresCluster(base / "pg")
            pg_server = cluster.start()
        for which in wanted:
            name, executor = ("RemoteExecutor", REMOTE) if which == "remote" else ("LocalExecutor", LOCAL)
            results[name] = bench_executor(name, executor, args, base, dags, pg_server)
    finally:
        if cluster:
            cluster.stop()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    report = {
        "benchmark": "dispatch",
        "config": {
            "db": args.db,
            "quick": args.quick,
            "chain_length": args.length,
            "chain_runs_per_executor": args.runs,
            "dispatch_samples_per_executor": args.length * args.runs,
            "agent_concurrency": args.concurrency,
            "agent_rtt_ms": args.agent_rtt_ms,
            "warmup": f"{WARMUP_DAG}: 3-task chain, not measured",
            "extra_env_both_planes": {**COMMON_ENV, **args.plane_env},
            "extra_env_agent": args.agent_env,
            "git": git_state,
            "host": {"loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "airflow": _version("apache-airflow-core"),
            "airflow_remote_execution": _version("airflow-remote-execution"),
        },
        "targets": TARGETS,
        "executors": results,
        "comparison": compare(results),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _git_state() -> dict | None:
    """The product code the planes ran: commit, and files changed in the working tree (not bench/)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=True).stdout

    try:
        dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": [f for f in dirty if not f.startswith("bench/")]}
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _vs_target(value: float | None, target: float, **extra) -> dict:
    return {"value": value, "target": target, "meets_target": value is not None and value <= target, **extra}


def compare(results: dict[str, dict]) -> dict:
    """Figures next to the issue's targets (reported, not asserted)."""
    out: dict = {}
    remote, local = results.get("RemoteExecutor"), results.get("LocalExecutor")
    if remote:
        # The targets are for an idle agent: judged on samples queued while the agent had a free slot.
        for label, key in (("ti", "dispatch_ms_idle_agent"), ("plane", "plane_dispatch_ms_idle_agent")):
            d, all_ = remote[key], remote[key.replace("_idle_agent", "")]
            out[f"remote_{label}_dispatch_p50_ms"] = _vs_target(d.get("p50"), TARGETS["dispatch_p50_ms"], all_samples=all_.get("p50"))
            out[f"remote_{label}_dispatch_p99_ms"] = _vs_target(d.get("p99"), TARGETS["dispatch_p99_ms"], all_samples=all_.get("p99"))
        out["remote_samples_agent_busy"] = remote["dispatch_ms_idle_agent"]["excluded_agent_busy"]
    if local:
        d = local["dispatch_ms"]
        out["local_ti_dispatch_ms"] = {"p50": d["p50"], "p95": d["p95"], "p99": d["p99"]}
    if remote and local:
        r, l_ = remote["dispatch_ms_idle_agent"], local["dispatch_ms"]
        out["ti_dispatch_remote_minus_local_ms"] = {q: round(r[q] - l_[q], 1) for q in ("p50", "p95", "p99")}
        ratio = remote["chain"]["wall_s_mean"] / local["chain"]["wall_s_mean"]
        out["chain_wall_s"] = {"remote_mean": remote["chain"]["wall_s_mean"], "local_mean": local["chain"]["wall_s_mean"]}
        out["chain_ratio_remote_over_local"] = _vs_target(round(ratio, 3), TARGETS["chain_ratio_remote_over_local"])
    return out


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""
Chaos: tasks over 3 agents while agents are SIGKILLed and restarted, and through an API outage.

Two modes, each on its own real plane (api-server, scheduler, dag-processor from
``scripts/localplane.py``, RemoteExecutor, DEFAULT ``[remote_execution]`` settings) with a fresh
database on one throwaway PostgreSQL cluster, and ``--agents`` real agents:

* ``kill``: ``--runs`` runs of ``chaos_work`` (``--tasks`` independent 1-3 s tasks, ``retries=5``)
  while every ``--kill-every`` seconds a random registered agent is SIGKILLed with everything under
  it (runners, supervisors, task processes: a node death) and restarted ``--restart-pause`` seconds
  later with the same name and token. Reports tasks lost, tries that ran twice at the same time, and
  the time from a kill to the victim's work running on a live agent.
* ``outage``: the same workload without kills; ``--outage-at`` seconds after the runs are triggered
  the api-server is stopped for ``--outage`` seconds. Reports task failures (a try > 1, or not
  success), failed work items and how long after the restart the agents leased again.

Every try records its start and end (``time.time_ns()``) and agent in a shared execution log
(``bench/dags/chaos_work.py``). Prints one JSON document on stdout (progress on stderr); nothing is
asserted, targets are reported next to the figures. See bench/README.md.

    .venv/bin/python bench/chaos.py [--mode kill,outage] [--quick] [--out FILE] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from itertools import combinations
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch import _git_state, _version, log, percentile  # noqa: E402
from localplane import Agent, Plane, PostgresCluster, fresh_pg_database, wait_for  # noqa: E402

BENCH_DAGS = Path(__file__).resolve().parent / "dags"
DAG_ID = "chaos_work"
TARGETS = {
    "tasks_lost": 0,
    "tries_run_concurrently_twice": 0,
    "unstarted_requeue_s_p95": 15.0,
    "outage_task_failures": 0,
}
COMMON_ENV = {
    "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "60",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
}
UNFINISHED = ("queued", "leased", "running")


def epoch(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def seconds_summary(values: list[float]) -> dict:
    vals = sorted(values)
    if not vals:
        return {"n": 0}
    r = lambda x: round(x, 2)  # noqa: E731
    return {
        "n": len(vals),
        "p50": r(percentile(vals, 0.50)),
        "p95": r(percentile(vals, 0.95)),
        "mean": r(statistics.fmean(vals)),
        "min": r(vals[0]),
        "max": r(vals[-1]),
    }


def ti_key(key: list) -> tuple:
    """(dag_id, run_id, task_id, map_index, try_number) of a work item key or an execution record."""
    if key and key[0] == "ti":  # work item: ["ti", dag, task, run, map_index, try]
        return (key[1], key[3], key[2], key[4], key[5])
    return tuple(key)


# --------------------------------------------------------------------------- processes


def kill_tree(agent: Agent) -> None:
    """SIGKILL an agent and everything under it (runners, supervisors, tasks), as a node death would."""
    pid = agent.proc.pid
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)  # anything left in the agent's session
    except ProcessLookupError:
        pass
    agent.proc.popen.wait(30)
    agent.proc.stop()  # closes its log handle


class AgentSlot:
    """One named agent that can be killed and restarted (same name, token and home)."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.log_offset = 0
        self.registered = False
        self.restarted_at: float | None = None
        self.registration_s: list[float] = []

    @property
    def name(self) -> str:
        return self.agent.name

    def start(self) -> None:
        self.log_offset = self.agent.proc.log_path.stat().st_size if self.agent.proc else 0
        self.registered = False
        self.restarted_at = time.time()
        self.agent.start()

    def poll_registered(self) -> bool:
        """True once the current process logged its registration (read from where it started)."""
        if not self.registered and self.agent.proc and self.agent.proc.alive():
            with open(self.agent.proc.log_path, "rb") as f:
                f.seek(self.log_offset)
                if b" registered: " in f.read():
                    self.registered = True
                    self.registration_s.append(time.time() - self.restarted_at)
        return self.registered


class DyingAgents:
    """Agents that die between lease and start confirmation (``bench/dying_agent.py``), each a new
    identity (a restarted one would take its predecessor's work back at registration, at once)."""

    def __init__(self, plane: Plane, home: Path):
        self.plane, self.home = plane, home
        self.home.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.pending: list[tuple[str, subprocess.Popen]] = []

    def spawn(self) -> None:
        self.count += 1
        name = f"dying-{self.count}"
        r = self.plane.api("POST", "/remote_execution/v1/admin/tokens", json={"agent_name": name, "queues": ["default"]})
        r.raise_for_status()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env["AIRFLOW_HOME"] = str(self.home)
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "dying_agent.py"), "--url", self.plane.url,
               "--token", r.json()["token"]]
        self.pending.append((name, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)))

    def deaths(self, block: bool = False) -> list[dict]:
        """Kills (as :meth:`KillMode.kill` records them) of the dying agents that have died by now."""
        out, still = [], []
        for name, proc in self.pending:
            if proc.poll() is None and not block:
                still.append((name, proc))
                continue
            try:
                stdout, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
            if not lines:
                log(f"kill: dying agent {name} printed no leases (exit {proc.returncode})")
                continue
            died = json.loads(lines[-1])
            held = [{"id": w["id"], "fence": w["fence"], "state": "leased", "key": None} for w in died["leases"]]
            out.append({"t": died["t"], "victim": name, "held": held, "dying_agent": True})
            log(f"kill: {name} died holding {len(held)} leased, unconfirmed")
        self.pending = still
        return out


class WorkMonitor(threading.Thread):
    """Polls the plane's leased and running work items every ``interval`` s: when each item of a
    killed agent left that agent (requeued or failed by the plane) is not in the final table."""

    def __init__(self, plane: Plane, interval: float = 1.0):
        super().__init__(name="work-monitor", daemon=True)
        self.plane, self.interval = plane, interval
        self.samples: list[tuple[float, dict[int, tuple[str, str | None, int]]]] = []
        self.stop = threading.Event()
        self.runs_done = threading.Event()  # set once every run in ``run_ids`` finished
        self.run_ids: list[str] = []
        self.errors = 0

    def run(self) -> None:
        last_runs_check = 0.0
        while not self.stop.wait(self.interval):
            if self.run_ids and time.monotonic() - last_runs_check > 3:
                last_runs_check = time.monotonic()
                if runs_done(self.plane, self.run_ids):
                    self.runs_done.set()
            try:
                t = time.time()
                seen = {}
                for state in ("leased", "running"):
                    for w in self.plane.work_items(state=state, limit=10_000):
                        seen[w["id"]] = (w["state"], w["agent_name"], w["fence"])
                self.samples.append((t, seen))
            except Exception:  # noqa: BLE001 - the api-server may be down or slow; keep polling
                self.errors += 1

    def left_victim(self, work_id: int, victim: str, fence: int, after: float, held_at_kill: bool = True) -> float | None:
        """First poll after ``after`` where the item was no longer the victim's lease ``fence`` (a lease
        granted after the kill must have been seen first)."""
        seen_held = held_at_kill
        for t, seen in self.samples:
            if t < after:
                continue
            cur = seen.get(work_id)
            if cur is not None and cur[1] == victim and cur[2] == fence:
                seen_held = True
            elif seen_held:
                return t
        return None


def runs_done(plane: Plane, run_ids: list[str]) -> bool:
    try:
        states = [plane.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{r}").json()["state"] for r in run_ids]
    except Exception:  # noqa: BLE001 - api-server down or busy: not done yet
        return False
    return all(s in ("success", "failed") for s in states)


# --------------------------------------------------------------------------- one mode


class Mode:
    """A plane, its agents and the workload of one mode."""

    def __init__(self, name: str, args, base: Path, pg_server: str):
        self.name, self.args = name, args
        self.home = base / name
        self.dags = self.home / "dags"
        self.dags.mkdir(parents=True)
        self.exec_log = self.home / "executions.jsonl"
        shutil.copy(BENCH_DAGS / "chaos_work.py", self.dags)
        (self.dags / "chaos.json").write_text(json.dumps({"tasks": args.tasks, "log": str(self.exec_log)}))
        env = {**COMMON_ENV, "AIRFLOW__CORE__PARALLELISM": str(args.parallelism), **args.plane_env}
        self.plane = Plane(self.home / "plane", db_url=fresh_pg_database(pg_server, f"chaos_{name}"), dags_folder=self.dags, extra_env=env)
        self.slots: list[AgentSlot] = []
        self.run_ids: list[str] = []

    def start(self) -> None:
        t0 = time.monotonic()
        log(f"{self.name}: starting plane (PostgreSQL) and {self.args.agents} agents")
        self.plane.start()
        for i in range(1, self.args.agents + 1):
            name = f"agent-{i}"
            token = self.plane.create_agent_token(name, "default")
            agent = Agent(
                name, self.home / name, self.plane.url, token, concurrency=self.args.concurrency, dags_folder=self.dags,
                extra_env={"REX_AGENT_NAME": name, **self.args.agent_env},
            )
            slot = AgentSlot(agent)
            slot.start()
            self.slots.append(slot)
        for slot in self.slots:
            slot.agent.wait_registered(180)
            slot.poll_registered()
        self.plane.wait_dag(DAG_ID, timeout=300)
        log(f"{self.name}: ready in {time.monotonic() - t0:.0f}s")

    def trigger(self) -> float:
        t = time.time()
        self.run_ids = [self.plane.trigger(DAG_ID) for _ in range(self.args.runs)]
        log(f"{self.name}: triggered {len(self.run_ids)} runs x {self.args.tasks} tasks")
        return t

    def wait_runs(self, timeout: float) -> bool:
        try:
            wait_for(lambda: runs_done(self.plane, self.run_ids), timeout, "the runs", 2.0)
            return True
        except TimeoutError:
            return False

    def stop(self) -> None:
        for slot in self.slots:
            if slot.agent.proc and slot.agent.proc.alive():
                slot.agent.stop()
        self.plane.stop()

    # ---------------------------------------------------------------- results

    def executions(self) -> dict[tuple, list[dict]]:
        """Execution log -> per try key, its executions {agent, pid, start, end} (seconds, epoch)."""
        by_pid: dict[tuple, dict] = {}
        if self.exec_log.exists():
            for line in self.exec_log.read_text().splitlines():
                rec = json.loads(line)
                k = (tuple(rec["key"]), rec["pid"])
                e = by_pid.setdefault(k, {"agent": rec["agent"], "pid": rec["pid"], "start": None, "end": None})
                e[rec["event"]] = rec["ns"] / 1e9
        out: dict[tuple, list[dict]] = defaultdict(list)
        for (key, _pid), e in by_pid.items():
            out[key].append(e)
        return out

    def final_state(self) -> dict:
        tis = [ti for r in self.run_ids for ti in self.plane.task_instances(DAG_ID, r)]
        runs = {r: self.plane.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{r}").json()["state"] for r in self.run_ids}
        items = self.plane.work_items(dag_id=DAG_ID, limit=10_000)
        agents = self.plane.api("GET", "/remote_execution/v1/admin/agents").json()
        return {"tis": tis, "runs": runs, "items": items, "agents": agents}

    def save_raw(self, final: dict, **extra) -> dict:
        """Everything the figures are computed from, next to the logs (kept with --keep; ``--analyze``)."""
        raw = {"run_ids": self.run_ids, "final": final, **extra}
        (self.home / "raw.json").write_text(json.dumps(raw, default=str))
        return json.loads((self.home / "raw.json").read_text())  # the figures come from what was saved

    @classmethod
    def from_raw(cls, args, home: Path) -> tuple[Mode, dict]:
        """A finished mode from its saved data (no plane): recompute the figures with ``--analyze``."""
        self = cls.__new__(cls)
        self.name, self.args, self.home = home.name, args, home
        self.exec_log = home / "executions.jsonl"
        raw = json.loads((home / "raw.json").read_text())
        self.run_ids = raw["run_ids"]
        if isinstance(self, KillMode):
            self.monitor = WorkMonitor.__new__(WorkMonitor)
            self.load_raw(raw)
        return self, raw

    def common_report(self, final: dict, execs: dict[tuple, list[dict]]) -> dict:
        tis, items = final["tis"], final["items"]
        not_success = [ti for ti in tis if ti["state"] != "success"]
        stuck = [w for w in items if w["state"] in UNFINISHED]
        ti_states: dict[str, int] = defaultdict(int)
        for ti in tis:
            ti_states[ti["state"] or "none"] += 1
        item_states: dict[str, int] = defaultdict(int)
        for w in items:
            item_states[w["state"]] += 1
        # Overlapping executions of one try: from the tasks' own records. An execution killed with its
        # agent has no end: it ended at the latest when its agent was killed (``self.killed_end``).
        concurrent, twice = [], 0
        for key, es in execs.items():
            if len(es) > 1:
                twice += 1
            spans = sorted((e["start"], e["end"] or self.killed_end(e), e["agent"]) for e in es if e["start"])
            for a, b in combinations(spans, 2):  # sorted by start: b starts after a
                if b[0] < a[1]:
                    concurrent.append({"key": list(key), "executions": [list(a), list(b)]})
        # Different tries of one task instance running at the same time (a try failed by the plane while
        # its process still ran somewhere, and the retry started): not a double run of one try, but
        # the task's code running twice at once all the same.
        by_ti: dict[tuple, list] = defaultdict(list)
        for key, es in execs.items():
            by_ti[key[:4]] += [(e["start"], e["end"] or self.killed_end(e), e["agent"], key[4]) for e in es if e["start"]]
        cross_try = [
            {"ti": list(ti), "executions": [list(a), list(b)]}
            for ti, spans in by_ti.items()
            for a, b in combinations(sorted(spans), 2)
            if a[3] != b[3] and b[0] < a[1]
        ]
        # The same from the plane: two work items of one try both started, their spans overlapping.
        by_key: dict[tuple, list[dict]] = defaultdict(list)
        for w in items:
            by_key[ti_key(w["key"])].append(w)
        plane_concurrent = 0
        for ws in by_key.values():
            spans = sorted((epoch(w["started_at"]), epoch(w["finished_at"]) or float("inf")) for w in ws if w["started_at"])
            plane_concurrent += sum(1 for a, b in combinations(spans, 2) if b[0] < a[1])
        return {
            "runs": final["runs"],
            "task_instances": len(tis),
            "ti_states": dict(ti_states),
            "tasks_not_success": [f"{ti['dag_run_id']}/{ti['task_id']}: {ti['state']} (try {ti['try_number']})" for ti in not_success][:50],
            "work_items_stuck_unfinished": [
                {k: w[k] for k in ("id", "key", "state", "agent_name", "fence", "leased_at", "started_at")} for w in stuck
            ][:50],
            "tasks_lost": len(not_success) + len(stuck),
            "work_item_states": dict(item_states),
            "executions_recorded": sum(len(es) for es in execs.values()),
            "tries_executed_more_than_once": twice,
            "tries_run_concurrently_twice": len(concurrent),
            "concurrent_examples": concurrent[:10],
            "work_items_of_one_try_overlapping": plane_concurrent,
            "tis_with_two_tries_running_at_once": len(cross_try),
            "two_tries_at_once_examples": cross_try[:10],
            "agents_at_end": {a["name"]: a["state"] for a in final["agents"]},
        }

    def killed_end(self, execution: dict) -> float:
        return float("inf")


class KillMode(Mode):
    def __init__(self, *a):
        super().__init__("kill", *a)
        self.kills: list[dict] = []
        self.monitor = WorkMonitor(self.plane)

    def killed_end(self, execution: dict) -> float:
        # A kill's time is taken just before the SIGKILLs: a task can still log its start while they go out.
        ends = [k["t"] for k in self.kills if k["victim"] == execution["agent"] and k["t"] >= execution["start"] - 1.0]
        return min(ends) if ends else float("inf")

    def run(self) -> dict:
        args = self.args
        self.start()
        self.monitor.start()
        t_trigger = self.trigger()
        self.monitor.run_ids = self.run_ids
        rng = random.Random(args.seed)
        pending_restart: dict[str, float] = {}
        next_kill = time.time() + args.kill_every
        dying = DyingAgents(self.plane, self.home / "dying")
        next_dying = time.time() + args.dying_every / 2 if args.dying_every else float("inf")
        kill_until = t_trigger + args.kill_max
        skipped = 0
        done = False
        while time.time() < kill_until:
            now = time.time()
            for slot in self.slots:
                slot.poll_registered()
                if slot.name in pending_restart and now >= pending_restart[slot.name]:
                    del pending_restart[slot.name]
                    slot.start()
            if self.monitor.runs_done.is_set():
                done = True
                break
            self.kills += dying.deaths()
            if now >= next_dying:
                next_dying = now + args.dying_every
                try:
                    dying.spawn()
                except Exception as e:  # noqa: BLE001 - the api-server may be slow; try at the next tick
                    log(f"kill: could not start a dying agent: {e!r}")
            if now >= next_kill:
                next_kill = now + args.kill_every  # from this kill: a slow API call never bunches kills up
                alive = [s for s in self.slots if s.registered and s.agent.proc.alive()]
                if not alive:
                    skipped += 1
                else:
                    self.kill(rng.choice(alive))
                    pending_restart[self.kills[-1]["victim"]] = time.time() + args.restart_pause
            time.sleep(0.1)
        killing_s = time.time() - t_trigger
        self.kills += dying.deaths(block=True)
        self.kills.sort(key=lambda k: k["t"])
        log(f"kill: {len(self.kills)} kills in {killing_s:.0f}s; runs {'finished' if done else 'not finished'}; restarting all")
        for slot in self.slots:
            if not slot.agent.proc.alive():
                slot.start()
        if not done:
            done = self.wait_runs(args.drain_timeout)
        log(f"kill: runs {'finished' if done else 'NOT finished'} after {time.time() - t_trigger:.0f}s")
        time.sleep(args.settle)  # agents report outcomes after their supervisors exit
        self.monitor.stop.set()
        raw = self.save_raw(
            self.final_state(), kills=self.kills, monitor=self.monitor.samples, t_trigger=t_trigger, t_end=time.time(),
            skipped=skipped, killing_s=killing_s, done=done, monitor_errors=self.monitor.errors,
            registration_s=[x for s in self.slots for x in s.registration_s[1:]],
        )
        return self.report(raw)

    def load_raw(self, raw: dict) -> None:
        self.kills = raw["kills"]
        self.monitor.samples = [(t, {int(k): tuple(v) for k, v in seen.items()}) for t, seen in raw["monitor"]]

    def report(self, raw: dict) -> dict:
        final, execs = raw["final"], self.executions()
        report = self.common_report(final, execs)
        report.update(self.kill_figures(final, execs))
        report.update(
            kills=len(self.kills),
            kill_ticks_skipped_no_registered_agent=raw.get("skipped"),
            killing_s=round(raw["killing_s"], 1) if raw.get("killing_s") else None,
            wall_s=round(raw["t_end"] - raw["t_trigger"], 1) if raw.get("t_end") else None,
            runs_finished=raw.get("done"),
            agent_registration_after_start_s=seconds_summary(raw.get("registration_s", [])),
            monitor_poll_errors=raw.get("monitor_errors"),
        )
        return report

    def kill(self, slot: AgentSlot) -> None:
        t = time.time()
        kill_tree(slot.agent)
        slot.registered = False
        # After the kill nothing of the victim can change these any more: what it held is what it lost.
        held = []
        for state in ("leased", "running"):
            try:
                held += [w for w in self.plane.work_items(state=state, limit=10_000) if w["agent_name"] == slot.name]
            except Exception as e:  # noqa: BLE001
                log(f"kill: could not list work items after the kill: {e}")
        self.kills.append({"t": t, "victim": slot.name, "held": held})
        log(f"kill #{len(self.kills)}: {slot.name} ({sum(w['state'] == 'leased' for w in held)} leased, "
            f"{sum(w['state'] == 'running' for w in held)} running)")

    def held_by_dead(self, kill: dict) -> list[dict]:
        """What the dead victim held: its leases right after the kill, plus leases the plane granted to
        its name before the restart (a long-poll lease request the api-server answered after the
        agent died), as seen by the monitor."""
        held = {(w["id"], w["fence"]): w for w in kill["held"]}
        for t, seen in self.monitor.samples:
            if kill["t"] <= t < kill["t"] + self.args.restart_pause:
                for work_id, (state, agent, fence) in seen.items():
                    if agent == kill["victim"] and (work_id, fence) not in held:
                        held[(work_id, fence)] = {"id": work_id, "fence": fence, "state": state, "key": None, "late": True}
        for w in held.values():
            if w["key"] is None:
                w["key"] = next((x["key"] for x in self.final_items if x["id"] == w["id"]), None)
        return [w for w in held.values() if w["key"] is not None]

    def kill_figures(self, final: dict, execs: dict[tuple, list[dict]]) -> dict:
        self.final_items = final["items"]
        items_by_id = {w["id"]: w for w in final["items"]}
        by_key: dict[tuple, list[dict]] = defaultdict(list)
        for w in final["items"]:
            by_key[ti_key(w["key"])].append(w)
        unstarted, unstarted_plane, unstarted_never = [], [], 0
        unstarted_dying: list[float] = []
        # A dying agent may lease what an earlier one left (requeued work is first in line): such an item
        # is timed from the last dying agent that held it, not from each.
        dying_leases = [(w["id"], w["fence"]) for k in self.kills if k.get("dying_agent") for w in k["held"]]
        re_leased_by_dying = 0
        retry, failed_by_plane, still_running, lost_declared, per_kill = [], [], 0, 0, []
        counted: set[tuple[int, int]] = set()
        stale = 0
        for k in self.kills:
            t, victim = k["t"], k["victim"]
            row = {"t": round(t - self.kills[0]["t"], 1), "victim": victim, "leased": 0, "running": 0, "stale": 0}
            for held in self.held_by_dead(k):
                if (held["id"], held["fence"]) in counted:
                    # Still the victim's from an earlier kill: that incarnation's work was never taken back
                    # (it re-registered before it was declared lost). Timed from the first kill only.
                    row["stale"] += 1
                    stale += 1
                    continue
                counted.add((held["id"], held["fence"]))
                final_item = items_by_id.get(held["id"])
                left = self.monitor.left_victim(held["id"], victim, held["fence"], t, held_at_kill=not held.get("late"))
                if held["state"] == "leased":
                    row["leased"] += 1
                    if any(i == held["id"] and f > held["fence"] for i, f in dying_leases):
                        re_leased_by_dying += 1
                        continue
                    if left is not None:
                        unstarted_plane.append(left - t)
                    started = epoch(final_item and final_item["started_at"])
                    if final_item and final_item["fence"] > held["fence"] and started:
                        unstarted.append(started - t)
                        if k.get("dying_agent"):
                            unstarted_dying.append(started - t)
                    else:
                        unstarted_never += 1
                    continue
                row["running"] += 1
                if final_item and final_item["state"] == "running" and final_item["fence"] == held["fence"]:
                    still_running += 1
                if final_item and final_item["state"] == "failed" and final_item["fence"] == held["fence"]:
                    failed_by_plane.append(epoch(final_item["finished_at"]) - t)
                    if "lost" in (final_item["info"] or ""):
                        lost_declared += 1
                key = ti_key(held["key"])
                nxt = [w for w in by_key.get((*key[:4], key[4] + 1), []) if w["started_at"]]
                if nxt:
                    retry.append(min(epoch(w["started_at"]) for w in nxt) - t)
            row["granted_after_death"] = sum(1 for w in self.held_by_dead(k) if w.get("late"))
            per_kill.append(row)
        return {
            "unstarted_requeue_s": {
                "definition": "per kill: work items the victim held LEASED (not confirmed started) right after the SIGKILL "
                "-> started_at of the same item under a newer lease (any live agent process, incl. the restarted victim). "
                "Real agents confirm within milliseconds of a lease, so most samples come from the dying agents "
                "(bench/dying_agent.py: lease, then SIGKILL before confirming). The target figure (<= 15 s with defaults).",
                "never_started_again": unstarted_never,
                "from_dying_agents": len(unstarted_dying),
                "not_timed_re_leased_by_a_later_dying_agent": re_leased_by_dying,
                **seconds_summary(unstarted),
            },
            "unstarted_left_victim_s": {
                "definition": "same items: kill -> first 1-s poll of the plane where the item was no longer the victim's "
                "lease (requeued by lost-agent detection or lease_confirm_timeout); what bounds unstarted_requeue_s",
                **seconds_summary(unstarted_plane),
            },
            "running_retry_s": {
                "definition": "per kill: tries the victim was RUNNING -> started_at of the next try (try_number + 1) on "
                "any live agent process (the retry waits for the plane to fail the try, then Airflow's retry_delay = 1 s, "
                "then behind the work already queued: a new try is a new work item at the back of the queue)",
                **seconds_summary(retry),
            },
            "running_failed_by_plane_s": {
                "definition": "same tries: kill -> the plane failed the victim's work item (finished_at)",
                "declared_lost": lost_declared,
                **seconds_summary(failed_by_plane),
            },
            "victim_running_items_never_failed": still_running,
            "items_still_held_from_an_earlier_kill": {
                "definition": "leased/running items listed for a victim that it already held at an earlier kill of the "
                "same agent: the restarted agent re-registered before the plane declared it lost, and the plane never "
                "took that work back (sum over kills)",
                "count": stale,
            },
            "per_kill": per_kill,
        }


class OutageMode(Mode):
    def __init__(self, *a):
        super().__init__("outage", *a)

    def run(self) -> dict:
        args = self.args
        self.start()
        t_trigger = self.trigger()
        time.sleep(max(0.0, t_trigger + args.outage_at - time.time()))
        log(f"outage: stopping the api-server for {args.outage}s")
        t_down = time.time()
        self.plane.stop_component("api-server")
        t_stopped = time.time()
        time.sleep(max(0.0, t_down + args.outage - time.time()))
        self.plane.start_component("api-server")
        t_start = time.time()
        self.plane.wait_healthy(300)
        t_up = time.time()
        log(f"outage: api-server healthy again {t_up - t_start:.1f}s after its start")
        done = self.wait_runs(args.drain_timeout)
        log(f"outage: runs {'finished' if done else 'NOT finished'} after {time.time() - t_trigger:.0f}s")
        time.sleep(args.settle)
        raw = self.save_raw(
            self.final_state(), t_trigger=t_trigger, t_down=t_down, t_stopped=t_stopped, t_start=t_start, t_up=t_up,
            t_end=time.time(), done=done, agents=[s.name for s in self.slots],
        )
        return self.report(raw)

    def report(self, raw: dict) -> dict:
        args, final, execs = self.args, raw["final"], self.executions()
        t_trigger, t_down, t_stopped, t_start, t_up = (raw[k] for k in ("t_trigger", "t_down", "t_stopped", "t_start", "t_up"))
        agent_names = raw.get("agents") or sorted({w["agent_name"] for w in final["items"] if w["agent_name"]})
        report = self.common_report(final, execs)
        retried = [ti for ti in final["tis"] if (ti["try_number"] or 0) > 1]
        failed_items = [w for w in final["items"] if w["state"] == "failed"]
        resumed = {}
        for name in agent_names:
            leases_after = [epoch(w["leased_at"]) for w in final["items"] if w["agent_name"] == name and w["leased_at"] and epoch(w["leased_at"]) > t_start]
            resumed[name] = round(min(leases_after) - t_up, 2) if leases_after else None
        # Task code running at some point while the API was going down or down (the stop drains requests).
        spanning = [e for es in execs.values() for e in es if e["start"] and e["start"] < t_up and (e["end"] is None or e["end"] > t_down)]
        # Workloads an agent had started before the API went away and finished after it was gone: their
        # supervisors and the agent's outcome report had to ride out the outage.
        items_spanning = [
            w for w in final["items"]
            if w["started_at"] and epoch(w["started_at"]) < t_stopped and (not w["finished_at"] or epoch(w["finished_at"]) > t_stopped)
        ]
        report.update(
            task_failures=len(retried) + sum(1 for ti in final["tis"] if ti["state"] != "success"),
            tis_with_try_number_gt_1=[f"{ti['dag_run_id']}/{ti['task_id']} try {ti['try_number']}: {ti['state']}" for ti in retried][:50],
            work_items_failed=len(failed_items),
            work_items_failed_info=sorted({w["info"] or "" for w in failed_items}),
            outage={
                "planned_s": args.outage,
                "stop_took_s": round(t_stopped - t_down, 1),
                "api_unreachable_s": round(t_up - t_stopped, 1),
                "api_server_startup_s": round(t_up - t_start, 1),
                "at_s_after_trigger": round(t_down - t_trigger, 1),
            },
            task_code_running_during_outage=len(spanning),
            work_items_spanning_outage={
                "definition": "started before the api-server was stopped, finished after: supervisor and outcome report rode it out",
                "count": len(items_spanning),
                "states": sorted({w["state"] for w in items_spanning}),
            },
            agents_resumed_leasing_s={
                "definition": "api-server healthy again -> first leased_at of a work item by that agent",
                **resumed,
            },
            wall_s=round(raw["t_end"] - t_trigger, 1) if raw.get("t_end") else None,
            runs_finished=raw.get("done"),
        )
        scheduler_log = self.home / "plane" / "logs-processes" / "scheduler.log"
        lost_lines = [ln for ln in scheduler_log.read_text(errors="replace").splitlines() if " is lost:" in ln]
        report["scheduler_lost_agent_lines"] = lost_lines[:10]
        return report


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="kill,outage", help="kill and/or outage, in order (default kill,outage)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run of 30 tasks, 20 s outage")
    p.add_argument("--runs", type=int, default=None, help="DAG runs per mode (default 5, --quick 1)")
    p.add_argument("--tasks", type=int, default=None, help="tasks per run (default 100, --quick 30)")
    p.add_argument("--agents", type=int, default=3, help="agents (default 3)")
    p.add_argument("--concurrency", type=int, default=4, help="slots per agent (default 4)")
    p.add_argument("--parallelism", type=int, default=32, help="[core] parallelism of the plane (default 32)")
    p.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills (default 10)")
    p.add_argument("--dying-every", type=float, default=10.0,
                   help="seconds between agents that die after leasing, before confirming (default 10; 0: none)")
    p.add_argument("--restart-pause", type=float, default=5.0, help="seconds from a kill to the victim's restart (default 5)")
    p.add_argument("--kill-max", type=float, default=None, help="stop killing after this many seconds (default 900, --quick 90)")
    p.add_argument("--outage", type=float, default=None, help="API outage in seconds (default 60, --quick 20)")
    p.add_argument("--outage-at", type=float, default=30.0, help="seconds after triggering the runs (default 30)")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="wait this long for the runs after the chaos (default 600)")
    p.add_argument("--settle", type=float, default=15.0, help="seconds to let agents report before reading results")
    p.add_argument("--seed", type=int, default=None, help="victim choice seed")
    p.add_argument("--plane-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for the plane (repeatable)")
    p.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for the agents (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    p.add_argument("--out", type=Path, help="also write the JSON to this file")
    p.add_argument("--analyze", type=Path, metavar="DIR", help="recompute the figures from a kept work dir (no run)")
    args = p.parse_args()
    args.runs = args.runs or (1 if args.quick else 5)
    args.tasks = args.tasks or (30 if args.quick else 100)
    args.kill_max = args.kill_max or (90.0 if args.quick else 900.0)
    args.outage = args.outage if args.outage is not None else (20.0 if args.quick else 60.0)
    args.plane_env = dict(kv.split("=", 1) for kv in args.plane_env)
    args.agent_env = dict(kv.split("=", 1) for kv in args.agent_env)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or set(modes) - {"kill", "outage"}:
        p.error("--mode takes kill and/or outage")
    if any(k.startswith("AIRFLOW__REMOTE_EXECUTION__") for k in args.plane_env):
        log("warning: [remote_execution] overridden on the plane: the targets are for the defaults")

    def _stop(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)

    started = time.monotonic()
    load_before = os.getloadavg()
    git_state = _git_state()
    results: dict[str, dict] = {}
    if args.analyze:
        for name in modes:
            mode, raw = (KillMode if name == "kill" else OutageMode).from_raw(args, args.analyze / name)
            results[name] = mode.report(raw)
        print(json.dumps(build_report(args, modes, git_state, load_before, results, started), indent=2))
        return 0
    base = Path(tempfile.mkdtemp(prefix="rex-chaos-"))
    os.chmod(base, 0o755)  # the postgres user (when running as root) must reach the cluster dir
    log(f"work dir {base}")
    cluster = PostgresCluster(base / "pg")
    try:
        pg_server = cluster.start()
        for name in modes:
            mode = (KillMode if name == "kill" else OutageMode)(args, base, pg_server)
            load_start = os.getloadavg()[0]
            try:
                results[name] = mode.run()
            except Exception as e:  # noqa: BLE001 - report what happened, keep the other mode
                log(f"{name}: FAILED: {e!r}")
                results[name] = {"error": repr(e)}
                for proc in [*mode.plane.procs.values(), *(s.agent.proc for s in mode.slots if s.agent.proc)]:
                    log(f"--- {proc.name} (last lines)\n{proc.tail(40)}")
            finally:
                mode.stop()
            results[name]["loadavg_1m"] = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
            results[name]["settings"] = {k: v for k, v in sorted(mode.plane.env.items()) if k.startswith(("AIRFLOW__REMOTE_EXECUTION__", "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__SCHEDULER__"))}
    finally:
        cluster.stop()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    report = build_report(args, modes, git_state, load_before, results, started)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def build_report(args, modes: list[str], git_state, load_before, results: dict, started: float) -> dict:
    return {
        "benchmark": "chaos",
        "config": {
            "modes": modes,
            "quick": args.quick,
            "runs": args.runs,
            "tasks_per_run": args.tasks,
            "agents": args.agents,
            "agent_concurrency": args.concurrency,
            "task": "PythonOperator sleeping 1.0-3.0 s (mean ~2 s), retries=5, retry_delay=1 s",
            "kill_every_s": args.kill_every,
            "restart_pause_s": args.restart_pause,
            "outage_s": args.outage,
            "db": "postgres",
            "extra_env_plane": {**COMMON_ENV, **args.plane_env},
            "extra_env_agents": args.agent_env,
            "git": git_state,
            "host": {"loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(), "python": platform.python_version()},
            "airflow": _version("apache-airflow-core"),
        },
        "targets": TARGETS,
        "results": results,
        "comparison": compare(results),
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def compare(results: dict) -> dict:
    out = {}
    k, o = results.get("kill", {}), results.get("outage", {})
    if "tasks_lost" in k:
        out["kill_tasks_lost"] = {"value": k["tasks_lost"], "target": 0, "meets_target": k["tasks_lost"] == 0}
        c = k["tries_run_concurrently_twice"]
        out["kill_tries_run_concurrently_twice"] = {"value": c, "target": 0, "meets_target": c == 0}
        u = k["unstarted_requeue_s"]
        out["kill_unstarted_requeue_s_p95"] = {
            "value": u.get("p95"), "p50": u.get("p50"), "n": u["n"], "target": 15.0,
            "meets_target": u.get("p95") is not None and u["p95"] <= 15.0,
        }
        r = k["running_retry_s"]
        out["kill_running_retry_s"] = {"p50": r.get("p50"), "p95": r.get("p95"), "n": r["n"]}
    if "task_failures" in o:
        out["outage_task_failures"] = {"value": o["task_failures"], "target": 0, "meets_target": o["task_failures"] == 0}
        out["outage_tasks_lost"] = {"value": o["tasks_lost"], "target": 0, "meets_target": o["tasks_lost"] == 0}
    return out


if __name__ == "__main__":
    sys.exit(main())

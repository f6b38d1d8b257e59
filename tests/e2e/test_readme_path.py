"""
README's "Use it with your Airflow", followed as written: its plane and agent configuration blocks and its
commands, read from README.md itself (so the test and the README cannot drift apart). Only what the README
leaves to the reader is filled in: your Airflow's own settings on the plane (PostgreSQL, port, login, the
shared jwt_secret the README asks for), and on the agent the DAG folder, the plane's URL and the token file.
Plane and agent have separate AIRFLOW_HOMEs and share nothing but the DAG files.

A deferrable DAG runs on the agent (its triggers on the agent's triggerer), task logs are read through the
REST API (what the UI calls) from the plane's log store (a deferred task's with its trigger's lines), the
plane never connects to the agent's log-server ports, and the agent does not warn about its executor setting.
"""

from __future__ import annotations

import configparser
import io
import re
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from e2e.test_task_logs import Tripwire
from localplane import AIRFLOW, EXAMPLE_DAGS, Proc, free_port, fresh_pg_database, wait_for

pytestmark = pytest.mark.e2e
README = Path(__file__).parents[2] / "README.md"
DAG = "remote_deferrable"


def readme_section() -> tuple[list[str], list[str]]:
    """The ini and bash blocks of README's "Use it with your Airflow" section, in order."""
    text = README.read_text()
    section = text[text.index("## Use it with your Airflow"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    return [b for lang, b in blocks if lang == "ini"], [b for lang, b in blocks if lang == "bash"]


def ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    return parser


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block, without comments."""
    return [shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)]


def write_cfg(path: Path, parser: configparser.ConfigParser) -> None:
    out = io.StringIO()
    parser.write(out)
    path.write_text(out.getvalue())


def env_for(home: Path) -> dict[str, str]:
    import os

    return {**{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}, "AIRFLOW_HOME": str(home)}


@pytest.fixture(scope="module")
def readme_path(tmp_path_factory, pg_url):
    (plane_ini, agent_ini), (install, plane_cmds, agent_cmds) = readme_section()
    assert commands(install)[0][:2] == ["pip", "install"]  # done: this venv has the package and its extras
    base = tmp_path_factory.mktemp("readme")
    dags = base / "dags"  # "the same DAG files as the plane"
    dags.mkdir()
    shutil.copy(EXAMPLE_DAGS / f"{DAG}.py", dags)
    port = free_port()
    tripwire = Tripwire(free_port())
    url = f"http://127.0.0.1:{port}"

    # The plane: your Airflow (PostgreSQL, port, login, the shared jwt_secret), plus README's block.
    plane_home = base / "plane"
    plane_home.mkdir()
    (plane_home / "passwords.json").write_text('{"admin": "admin"}')
    plane_cfg = ini(f"""
[core]
dags_folder = {dags}
load_examples = False
simple_auth_manager_users = admin:admin
simple_auth_manager_passwords_file = {plane_home / "passwords.json"}
[database]
sql_alchemy_conn = {fresh_pg_database(pg_url, "readme_path")}
[api]
port = {port}
host = 127.0.0.1
base_url = {url}
[api_auth]
jwt_secret = {secrets.token_urlsafe(48)}
[logging]
worker_log_server_port = {tripwire.sock.getsockname()[1]}
trigger_log_server_port = {tripwire.sock.getsockname()[1]}
""")
    plane_cfg.read_string(plane_ini)
    write_cfg(plane_home / "airflow.cfg", plane_cfg)
    plane_env = env_for(plane_home)

    procs: list[Proc] = []
    token = None
    for cmd in commands(plane_cmds):
        assert cmd[0] == "airflow", cmd
        if cmd[1] in ("db", "remote-execution"):  # run to completion
            out = subprocess.run([AIRFLOW, *cmd[1:]], env=plane_env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
            if cmd[1:3] == ["remote-execution", "tokens"]:
                token = re.search(r"^rex_\S+$", out.stdout, re.M).group(0)  # printed alone on its line
        else:  # a plane component
            procs.append(Proc(cmd[1], [AIRFLOW, *cmd[1:]], plane_env, plane_home))
    assert token, "no token printed by `tokens create`"
    wait_for(lambda: requests.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200, 180, "api-server")

    # The agent: README's airflow.cfg with only its placeholders replaced.
    agent_home = base / "agent"
    agent_home.mkdir()
    (agent_home / "token").write_text(token)
    (agent_home / "token").chmod(0o600)
    agent_cfg = ini(agent_ini)
    assert agent_cfg["core"]["dags_folder"] == "/opt/airflow/dags"
    agent_cfg["core"]["dags_folder"] = str(dags)
    agent_cfg["remote_execution"]["api_url"] = url
    agent_cfg["remote_execution"]["token_file"] = str(agent_home / "token")
    write_cfg(agent_home / "airflow.cfg", agent_cfg)
    (agent_cmd,) = commands(agent_cmds)
    agent = Proc("agent", [AIRFLOW, *agent_cmd[1:]], env_for(agent_home), agent_home)
    procs.append(agent)
    try:
        wait_for(lambda: "registered" in agent.log_path.read_text(errors="replace"), 120, "the agent registered")
        yield url, agent, tripwire
    finally:
        for proc in reversed(procs):
            proc.stop(60)
        tripwire.close()
        for proc in procs:
            print(f"--- {proc.name}\n{proc.tail(40)}")


def test_readme_path_runs_a_deferrable_dag_and_shows_its_logs(readme_path):
    url, agent, tripwire = readme_path
    r = requests.post(f"{url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=10)
    r.raise_for_status()
    auth = {"Authorization": f"Bearer {r.json()['access_token']}"}

    def api(method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, f"{url}{path}", headers={**auth, **kw.pop("headers", {})}, timeout=30, **kw)

    wait_for(lambda: api("GET", f"/api/v2/dags/{DAG}").status_code == 200, 180, "the DAG parsed by the plane", 0.5)
    api("PATCH", f"/api/v2/dags/{DAG}", json={"is_paused": False}).raise_for_status()
    r = api("POST", f"/api/v2/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": {"wait_seconds": 5}})
    r.raise_for_status()
    run_id = r.json()["dag_run_id"]

    def states():
        tis = api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}

    seen_deferred = set()

    def done():
        now = states()
        seen_deferred.update(t for t, s in now.items() if s == "deferred")
        run = api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}").json()["state"]
        return run if run in ("success", "failed") else None

    assert wait_for(done, 420, "the deferrable run", 0.5) == "success", states()
    assert seen_deferred, "no task deferred"

    def log_of(task_id: str) -> tuple[list[str], list[str]] | None:
        r = api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1",
                headers={"Accept": "application/json"})
        r.raise_for_status()
        events = [m.get("event", "") for m in r.json()["content"]]
        start, end = events.index("::group::Log message source details"), events.index("::endgroup::")
        return events[end + 1:], events[start + 1:end]

    # The last task's log (its last lines arrive once its supervisor is done, moments after the run ends).
    last: list = []

    def shown():
        last[:] = [log_of("after_waiting")]
        return any("resumed and done on an agent" in e for e in last[0][0]) and last[0]

    try:
        events, sources = wait_for(shown, 60, "the log of after_waiting", 0.5)
    except TimeoutError:
        raise AssertionError(f"after_waiting's log as the API shows it: {last}") from None
    assert any("log store" in s for s in sources), sources
    # A task that deferred and resumed: its log has its trigger's lines too (sent by the agent's triggerer).
    for task_id in sorted(seen_deferred):
        deferred_events, deferred_sources = log_of(task_id)
        assert any("trigger starting" in e for e in deferred_events), (task_id, deferred_events)
        assert any("trigger(s)" in s for s in deferred_sources), deferred_sources
    assert tripwire.connections == 0, "the plane tried to reach the agent's log server"
    agent_log = agent.log_path.read_text(errors="replace")
    assert "fail to load on this agent" not in agent_log, "the executor warning, with README's agent config"

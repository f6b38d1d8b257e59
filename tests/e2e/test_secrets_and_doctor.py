"""
Secrets stay on the customer's side: a real plane (TLS) and two agents without a database, one whose
``[workers] secrets_backend`` is OpenBao (Vault API, token file), one AWS Secrets Manager (moto). A task
on each reads a connection and a variable that exist only in that backend. Then the doctor
(``airflow remote-execution check``) in an agent's home: passes, and fails with a hint for a bad API
URL, a wrong CA, a revoked token and an unreachable secrets backend.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import boto3
import hvac
import pytest
import requests

from airflow_remote_execution.agent.secrets_config import KWARG_ENV_PREFIX, SecretsOptions, build
from emulators import AWS_TEST_CREDENTIALS, OPENBAO_ROOT_TOKEN, moto, openbao
from localplane import AIRFLOW, Agent, Plane, free_port, fresh_pg_database, self_signed_cert

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
DAG = "remote_secrets_probe"
DOCTOR = ("api", "token", "clock", "secrets", "disk")  # this task's checks; other parts' checks are tested there


def backend_env(config, **kwarg_env: str) -> dict[str, str]:
    env = {"AIRFLOW__WORKERS__SECRETS_BACKEND": config.class_path,
           "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS": config.kwargs_json}
    env.update({KWARG_ENV_PREFIX + k.upper(): v for k, v in kwarg_env.items()})
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("secrets-e2e")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / f"{DAG}.py", dags)
    cert, key = self_signed_cert(base / "tls")
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "secrets_e2e"), dags_folder=dags, tls=(cert, key))
    agents: list[Agent] = []
    with openbao() as bao, moto() as aws:
        vault = hvac.Client(url=bao.url, token=OPENBAO_ROOT_TOKEN)
        vault.secrets.kv.v2.create_or_update_secret(
            "connections/probe_db", secret={"conn_uri": "postgres://u:pw-vault@vault-db.internal:5432"})
        vault.secrets.kv.v2.create_or_update_secret("variables/probe_greeting", secret={"value": "hello from vault"})
        sm = boto3.client("secretsmanager", endpoint_url=aws.url, **AWS_TEST_CREDENTIALS)
        sm.create_secret(Name="airflow/connections/probe_db", SecretString=json.dumps(
            {"conn_type": "mysql", "host": "aws-db.internal", "port": 3306, "login": "u", "password": "pw-aws"}))
        sm.create_secret(Name="airflow/variables/probe_greeting", SecretString="hello from aws")
        token_file = base / "vault-token"
        token_file.write_text(OPENBAO_ROOT_TOKEN)
        vault_config = build(SecretsOptions("vault", url=bao.url, token_file=str(token_file)))
        aws_config = build(SecretsOptions("aws", region="us-east-1", endpoint_url=aws.url))
        # A loaded test machine can stall the api-server for many seconds: the Task SDK's 5 s default fails tasks.
        common = {"AIRFLOW__REMOTE_EXECUTION__CA_BUNDLE": str(cert), "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60"}
        try:
            plane.start()
            for name, queue, env in (
                ("vault-agent", "vault", backend_env(vault_config)),
                ("aws-agent", "aws", backend_env(aws_config, aws_access_key_id="testing",
                                                 aws_secret_access_key="testing")),
            ):
                token = plane.create_agent_token(name, queue)
                agents.append(Agent(name, base / name, plane.url, token, dags_folder=dags,
                                    extra_env={**common, **env}).start())
            for agent in agents:
                agent.wait_registered()
            # The api-server's first execution-API request took 20-40 s on this loaded machine; tasks that meet
            # it fail (Task SDK timeouts). Warm it up, as a deployment's health checks would.
            requests.get(f"{plane.url}/execution/health", verify=str(cert), timeout=300).raise_for_status()
            yield plane, {a.name: a for a in agents}, {"cert": cert, "vault_config": vault_config}
        finally:
            for agent in agents:
                agent.stop()
            plane.stop()
            for proc in [*plane.procs.values(), *(a.proc for a in agents)]:
                print(f"--- {proc.name}\n{proc.tail(30)}")


def test_tasks_read_connections_and_variables_only_from_the_agents_backend(setup):
    plane, agents, _ = setup
    run_id = plane.trigger(DAG)
    state = plane.wait_run(DAG, run_id, timeout=240)
    tis = {ti["task_id"]: ti for ti in plane.task_instances(DAG, run_id)}
    assert state == "success", ({t: ti["state"] for t, ti in tis.items()}, task_logs(agents.values()))

    def returned(task_id: str) -> str:
        path = f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return plane.api("GET", path).json()["value"]

    assert returned("on_vault") == "postgres://vault-db.internal:5432 hello from vault"
    assert returned("on_aws") == "mysql://aws-db.internal:3306 hello from aws"
    assert {tis["on_vault"]["hostname"], tis["on_aws"]["hostname"]} and {
        w["agent_name"] for w in plane.work_items(dag_id=DAG, run_id=run_id)} == {"vault-agent", "aws-agent"}
    # The plane never had them.
    assert plane.api("GET", "/api/v2/connections/probe_db").status_code == 404
    assert plane.api("GET", "/api/v2/variables/probe_greeting").status_code == 404


def task_logs(agents) -> str:
    return "\n".join(f"== {log}\n{log.read_text(errors='replace')[-3000:]}"
                     for agent in agents for log in sorted((agent.home / "logs").rglob("*.log")) if DAG in str(log))


def doctor(agent: Agent, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIRFLOW, "remote-execution", "check", "--only", ",".join(DOCTOR), *args],
        env={**agent.env, **env}, capture_output=True, text=True, timeout=180,
    )


def lines(out: str) -> dict[str, str]:
    """check name -> its line (and hint), from the doctor's output."""
    found: dict[str, str] = {}
    last = None
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("PASS", "FAIL", "SKIP", "WARN"):
            last = parts[1]
            found[last] = line
        elif last and line.strip().startswith("hint:"):
            found[last] += "\n" + line.strip()
    return found


def test_doctor_passes_in_the_agents_home(setup):
    _, agents, _ = setup
    result = doctor(agents["vault-agent"], "--probe-conn", "probe_db", "--probe-var", "probe_greeting")
    assert result.returncode == 0, result.stdout + result.stderr
    got = lines(result.stdout)
    assert [got[name].split()[0] for name in DOCTOR] == ["PASS"] * 5, result.stdout
    assert "TLS verified with" in got["api"]
    assert "agent vault-agent, token " in got["token"] and "queues vault" in got["token"]
    assert "connection 'probe_db' found (conn_type postgres); variable 'probe_greeting' found" in got["secrets"]
    assert "pw-vault" not in result.stdout and "hello from vault" not in result.stdout


def test_doctor_fails_with_hints(setup, tmp_path):
    plane, agents, extra = setup
    agent = agents["vault-agent"]

    bad_url = doctor(agent, **{"AIRFLOW__REMOTE_EXECUTION__API_URL": f"https://127.0.0.1:{free_port()}"})
    assert bad_url.returncode == 1
    got = lines(bad_url.stdout)
    assert got["api"].startswith("FAIL") and "refused" in got["api"] and "hint: nothing listens there" in got["api"]

    other_ca, _ = self_signed_cert(tmp_path / "other-ca")
    wrong_ca = doctor(agent, **{"AIRFLOW__REMOTE_EXECUTION__CA_BUNDLE": str(other_ca)})
    assert wrong_ca.returncode == 1
    got = lines(wrong_ca.stdout)
    assert got["api"].startswith("FAIL") and "TLS verification failed" in got["api"] and "ca_bundle" in got["api"]

    token = plane.create_agent_token("doomed", "vault")
    plane.airflow("remote-execution", "tokens", "revoke", token.split("_")[1])
    token_file = tmp_path / "revoked-token"
    token_file.write_text(token)
    revoked = doctor(agent, **{"AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE": str(token_file)})
    assert revoked.returncode == 1
    got = lines(revoked.stdout)
    assert got["api"].startswith("PASS")
    assert got["token"].startswith("FAIL") and "was revoked" in got["token"] and "tokens create" in got["token"]

    down = build(SecretsOptions("vault", url=f"http://127.0.0.1:{free_port()}",
                                token_file=extra["vault_config"].kwargs["token_path"]))
    unreachable = doctor(agent, **backend_env(down))
    assert unreachable.returncode == 1
    got = lines(unreachable.stdout)
    assert got["secrets"].startswith("FAIL") and "hint: cannot reach the secrets backend" in got["secrets"]
    assert got["api"].startswith("PASS") and got["token"].startswith("PASS")

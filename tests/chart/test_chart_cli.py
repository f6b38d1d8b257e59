"""The chart renders the agent's Airflow configuration exactly as the CLI helpers write it: `airflow
remote-execution secrets configure --write` and `bundles add-git/add-local --write`, run in a fresh
AIRFLOW_HOME, give the same options and values (and ask for the same environment variables) as the chart
for the same input. (A file of its own: these run the Airflow CLI, ~20 s; xdist runs it beside the rest.)"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import by_kind, render
from .test_chart import MINIMAL

pytestmark = pytest.mark.chart
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def _cli(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:////nonexistent/agents-have-no-metadata-db.db")
    result = subprocess.run([AIRFLOW, "remote-execution", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"airflow remote-execution {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _secrets_cases(files: Path) -> dict[str, tuple[dict, list[str]]]:
    ca, key, token, jwt = (files / n for n in ("ca.pem", "sa.json", "vault-token", "jwt"))
    for f in (ca, key, token, jwt):
        f.write_text("x")
    return {
        "aws": ({"backend": "aws", "caBundle": str(ca), "connectionsPrefix": "team/conn",
                 "aws": {"region": "eu-west-1", "roleArn": "arn:aws:iam::1:role/r", "profile": "p",
                         "endpointUrl": "https://vpce.example.com/"}},
                ["--backend", "aws", "--ca-bundle", str(ca), "--connections-prefix", "team/conn", "--region",
                 "eu-west-1", "--role-arn", "arn:aws:iam::1:role/r", "--profile", "p", "--endpoint-url",
                 "https://vpce.example.com/"]),
        "azure": ({"backend": "azure", "variablesPrefix": "vars", "azure": {
                      "vaultUrl": "https://team.vault.azure.net", "tenantId": "t", "clientId": "c",
                      "managedIdentityClientId": "m", "clientSecret": {"secretName": "sp", "key": "secret"}}},
                  ["--backend", "azure", "--variables-prefix", "vars", "--vault-url", "https://team.vault.azure.net",
                   "--tenant-id", "t", "--client-id", "c", "--managed-identity-client-id", "m"]),
        "gcp": ({"backend": "gcp", "gcp": {"projectId": "acme-prod", "keyFile": str(key)}},
                ["--backend", "gcp", "--project-id", "acme-prod", "--key-file", str(key)]),
        "vault-token": ({"backend": "vault", "vault": {"url": "https://vault:8200", "tokenFile": str(token),
                                                       "mountPoint": "kv", "kvVersion": 1}},
                        ["--backend", "vault", "--url", "https://vault:8200", "--token-file", str(token),
                         "--mount-point", "kv", "--kv-version", "1"]),
        "vault-approle": ({"backend": "vault", "connectionsPrefix": "/c/", "vault": {
                              "url": "https://vault:8200", "authType": "approle", "roleId": "r1",
                              "authMountPoint": "approle2", "secretId": {"secretName": "s", "key": "k"}}},
                          ["--backend", "vault", "--connections-prefix", "/c/", "--url", "https://vault:8200",
                           "--auth-type", "approle", "--role-id", "r1", "--auth-mount-point", "approle2"]),
        "vault-kubernetes": ({"backend": "vault", "vault": {"url": "http://vault:8200", "authType": "kubernetes",
                                                            "kubernetesRole": "agent", "kubernetesJwtPath": str(jwt)}},
                             ["--backend", "vault", "--url", "http://vault:8200", "--auth-type", "kubernetes",
                              "--kubernetes-role", "agent", "--kubernetes-jwt-path", str(jwt)]),
    }


def test_chart_config_is_what_the_cli_helpers_write(tmp_path):
    """`secrets configure --write` and `bundles add-git/add-local --write` in a fresh AIRFLOW_HOME produce the
    same options and values as the chart renders for the same input."""
    (tmp_path / "files").mkdir()
    cases = _secrets_cases(tmp_path / "files")
    bundles_values = [
        {"name": "team-a-dags", "type": "git", "repoUrl": "https://git.example.com/a/dags.git", "connId": "git_dags",
         "subdir": "dags", "trackingRef": "release", "refreshInterval": 60, "submodules": True},
        {"name": "anon", "type": "git", "repoUrl": "https://git.example.com/b.git"},
        {"name": "local-100%", "type": "local", "path": "/srv/dags", "refreshInterval": 0},
    ]

    def cli_secrets(name):
        home = tmp_path / name
        out = _cli(home, "secrets", "configure", *cases[name][1], "--write", "--config-file", str(home / "airflow.cfg"))
        env = set(re.findall(r"^export (\w+)=", out, re.M))
        return name, (home / "airflow.cfg").read_text(), env

    def cli_bundles():
        home = tmp_path / "bundles"
        _cli(home, "bundles", "add-git", "team-a-dags", "--repo-url", "https://git.example.com/a/dags.git",
             "--conn-id", "git_dags", "--subdir", "dags", "--tracking-ref", "release", "--refresh-interval", "60",
             "--submodules", "--write", "--skip-checks")
        _cli(home, "bundles", "add-git", "anon", "--repo-url", "https://git.example.com/b.git", "--write",
             "--skip-checks")
        _cli(home, "bundles", "add-local", "local-100%", "--path", "/srv/dags", "--refresh-interval", "0", "--write",
             "--skip-checks")
        _cli(home, "bundles", "remove", "dags-folder")
        return (home / "airflow.cfg").read_text()

    with ThreadPoolExecutor(4) as pool:
        secrets_futures = [pool.submit(cli_secrets, name) for name in cases]
        bundles_future = pool.submit(cli_bundles)
        written = {name: (text, env) for name, text, env in (f.result() for f in secrets_futures)}
        bundles_text = bundles_future.result()

    def parse(text):  # as Airflow reads it: with interpolation ("%%" -> "%")
        parser = configparser.ConfigParser()
        parser.read_string(text)
        return parser

    for name, (values, _args) in cases.items():
        objects = render({**MINIMAL, "secretsBackend": values})
        (sts,) = by_kind(objects, "StatefulSet")
        chart = parse(_cfg_text(objects, sts))
        cli_text, cli_env = written[name]
        cli = parse(cli_text)
        assert chart["workers"]["secrets_backend"] == cli["workers"]["secrets_backend"], name
        assert json.loads(chart["workers"]["secrets_backend_kwargs"]) == json.loads(
            cli["workers"]["secrets_backend_kwargs"]), name
        # The environment variables the CLI asks for are the ones the chart sets (from Secrets).
        agent = sts["spec"]["template"]["spec"]["containers"][0]
        chart_env = {e["name"] for e in agent["env"]} - {"AIRFLOW_CONFIG", "AGENT_ORDINAL",
                                                          "AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE"}
        assert chart_env == cli_env, name

    objects = render({**MINIMAL, "dagBundles": bundles_values})
    (sts,) = by_kind(objects, "StatefulSet")
    chart = parse(_cfg_text(objects, sts))
    cli = parse(bundles_text)
    assert json.loads(chart["dag_processor"]["dag_bundle_config_list"]) == json.loads(
        cli["dag_processor"]["dag_bundle_config_list"])


def _cfg_text(objects, sts) -> str:
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    (cm,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    return cm["data"]["airflow.cfg"]

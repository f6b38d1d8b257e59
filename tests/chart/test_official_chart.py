"""The plane side: docs/kubernetes.md's values snippet for the official Apache Airflow chart, rendered with that
chart (tests/chart/fixtures/airflow-<version>.tgz; see fixtures/README.md), must give a plane the agents can use:
RemoteExecutor, the provider's image, /remote_execution and /execution through the api-server's ingress, one
JWT secret for scheduler and api-server. The snippet is read from the doc, so the two cannot drift."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from .conftest import KUBE_VERSIONS, ROOT, by_kind, run_helm

pytestmark = pytest.mark.chart
DOC = ROOT / "docs" / "kubernetes.md"
FIXTURES = Path(__file__).parent / "fixtures"
EXECUTOR = "airflow_remote_execution.executors.RemoteExecutor"
AGENT_PATHS = ("/remote_execution/v1/agents/register", "/execution/task-instances/x/run")


def official_chart() -> Path:
    """REX_AIRFLOW_CHART, or the newest airflow-*.tgz in fixtures/ (not in git: fixtures/README.md)."""
    if os.environ.get("REX_AIRFLOW_CHART"):
        return Path(os.environ["REX_AIRFLOW_CHART"])
    found = sorted(FIXTURES.glob("airflow-*.tgz"))
    if not found:
        pytest.skip("the official Apache Airflow chart is not in tests/chart/fixtures/ (see its README.md)")
    return found[-1]


def doc_snippet() -> str:
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S) if "values-plane.yaml" in b]
    assert len(blocks) == 1, "docs/kubernetes.md must hold exactly one values-plane.yaml snippet"
    return blocks[0]


@pytest.fixture(scope="module")
def snippet(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("plane") / "values-plane.yaml"
    path.write_text(doc_snippet())
    return path, yaml.safe_load(path.read_text())


def render_plane(values: Path, helm: str = "helm4", kube_version: str = KUBE_VERSIONS[-1]) -> list[dict]:
    result = run_helm(helm, "template", "airflow", str(official_chart()), "-n", "airflow", "-f", str(values),
                      "--kube-version", kube_version)
    assert result.returncode == 0, f"the official chart refuses the doc's snippet:\n{result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


@pytest.fixture(scope="module")
def plane(snippet) -> list[dict]:
    return render_plane(snippet[0])


def airflow_cfg(objects) -> configparser.ConfigParser:
    (cm,) = [c for c in by_kind(objects, "ConfigMap") if "airflow.cfg" in c.get("data", {})]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(cm["data"]["airflow.cfg"])
    return parser


def workloads(objects) -> dict[str, dict]:
    """component label -> pod spec, for every Deployment, StatefulSet and Job of the Airflow chart itself."""
    return {o["spec"]["template"]["metadata"]["labels"].get("component", o["metadata"]["name"]): o["spec"]["template"]["spec"]
            for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")
            and o["metadata"].get("labels", {}).get("tier") == "airflow"}


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_fixture_is_the_apache_chart():
    with tarfile.open(official_chart()) as tar:
        chart = yaml.safe_load(tar.extractfile("airflow/Chart.yaml"))
        license_text = tar.extractfile("airflow/LICENSE").read().decode()
        template = tar.extractfile("airflow/templates/api-server/api-server-ingress.yaml").read().decode()
    assert chart["name"] == "airflow" and chart["home"] == "https://airflow.apache.org/"
    assert tuple(int(x) for x in chart["version"].split(".")[:2]) >= (1, 19), chart["version"]
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert "Licensed to the Apache Software Foundation" in template


def test_executor_is_remote_executor(plane):
    assert airflow_cfg(plane)["core"]["executor"] == EXECUTOR
    for component, spec in workloads(plane).items():
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            assert env_of(c).get("AIRFLOW__CORE__EXECUTOR", EXECUTOR) == EXECUTOR, (component, c["name"])


def test_airflow_runs_the_image_with_the_provider(plane, snippet):
    image = snippet[1]["images"]["airflow"]
    expected = f"{image['repository']}:{image['tag']}"
    specs = workloads(plane)
    assert {"scheduler", "api-server", "triggerer", "run-airflow-migrations"} <= set(specs), sorted(specs)
    for component in ("scheduler", "api-server", "triggerer", "run-airflow-migrations"):
        airflow_containers = [c for c in [*specs[component].get("initContainers", []), *specs[component]["containers"]]
                              if "airflow" in " ".join(c.get("args", []) + c.get("command", []))]
        assert airflow_containers, component
        for c in airflow_containers:
            assert c["image"] == expected, (component, c["name"], c["image"])
            # The chart relies on the official image's entrypoint: the agent image (entrypoint
            # `airflow remote-execution`) cannot be the plane's image.
            assert "command" not in c and c["args"][0] in ("bash", "airflow"), (component, c["name"])
    assert image["repository"] != yaml.safe_load((ROOT / "chart" / "values.yaml").read_text())["image"]["repository"]


def test_api_server_ingress_exposes_the_agents_paths(plane):
    (service,) = [s for s in by_kind(plane, "Service") if s["spec"]["selector"].get("component") == "api-server"]
    (port,) = service["spec"]["ports"]
    api_server = next(c for c in workloads(plane)["api-server"]["containers"] if c["name"] == "api-server")
    assert port.get("targetPort", port["port"]) in [p["containerPort"] for p in api_server["ports"]]
    assert "airflow api-server" in " ".join(api_server["args"])
    (ingress,) = by_kind(plane, "Ingress")
    assert ingress["spec"]["tls"][0]["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    for url_path in AGENT_PATHS:
        routes = [p["backend"]["service"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]
                  if p["pathType"] == "Prefix" and url_path.startswith(p["path"].rstrip("/") + "/")]
        assert routes, f"no Prefix path of the ingress covers {url_path}"
        assert routes[0] == {"name": service["metadata"]["name"], "port": {"name": port["name"]}}, routes


def test_ingress_waits_longer_than_a_long_poll(plane):
    from airflow_remote_execution.get_provider_info import get_provider_info

    long_poll = float(get_provider_info()["config"]["remote_execution"]["options"]["long_poll_wait"]["default"])
    (ingress,) = by_kind(plane, "Ingress")
    assert float(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 3 * long_poll


def test_scheduler_and_api_server_share_one_jwt_secret(plane):
    specs = workloads(plane)
    refs = []
    for component in ("scheduler", "api-server"):
        (main,) = [c for c in specs[component]["containers"] if c["name"] == component]
        refs.append(env_of(main)["AIRFLOW__API_AUTH__JWT_SECRET"]["secretKeyRef"])
    assert refs[0] == refs[1], refs
    assert refs[0]["name"] in [s["metadata"]["name"] for s in by_kind(plane, "Secret")]


def test_the_plane_cannot_create_pods(plane):
    for role in [*by_kind(plane, "Role"), *by_kind(plane, "ClusterRole")]:
        for rule in role.get("rules", []):
            assert not ("pods" in rule["resources"] and "create" in rule["verbs"]), role["metadata"]["name"]


def test_rendered_config_loads_in_airflow(plane, tmp_path):
    """Airflow, given the chart's airflow.cfg, loads RemoteExecutor and the provider's task log handler."""
    (cm,) = [c for c in by_kind(plane, "ConfigMap") if "airflow.cfg" in c.get("data", {})]
    (tmp_path / "airflow.cfg").write_text(cm["data"]["airflow.cfg"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW_CONFIG=str(tmp_path / "airflow.cfg"),
               AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(tmp_path / "logs"), AIRFLOW__METRICS__STATSD_ON="False")
    code = ("import logging; from airflow.executors.executor_loader import ExecutorLoader; "
            "cls, _ = ExecutorLoader.import_default_executor_cls(); "
            "print(cls.__module__ + '.' + cls.__name__); "
            "print([type(h).__name__ for h in logging.getLogger('airflow.task').handlers])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    executor, handlers = result.stdout.strip().splitlines()[-2:]
    assert executor == "airflow_remote_execution.executors.remote_executor.RemoteExecutor"
    assert handlers == "['RemoteExecutionTaskHandler']", handlers


def test_snippet_options_are_known(snippet):
    """A misspelled option in the snippet's `config` would be silently ignored by Airflow."""
    from airflow.configuration import conf

    from airflow_remote_execution.get_provider_info import get_provider_info

    known = {s: set(d.get("options", {})) for s, d in conf.configuration_description.items()}
    for section, d in get_provider_info()["config"].items():
        known.setdefault(section, set()).update(d["options"])
    for section, options in snippet[1]["config"].items():
        for option in options:
            assert option in known.get(section, set()), f"[{section}] {option}"


def test_rendered_plane_is_valid_kubernetes(snippet, plane):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    for kube_version in KUBE_VERSIONS:
        objects = plane if kube_version == KUBE_VERSIONS[-1] else render_plane(snippet[0], kube_version=kube_version)
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid for Kubernetes {kube_version}: {e}")


def test_helm3_renders_the_same(snippet, plane):
    """Generated secrets (jwt, fernet, api key) and their checksum annotations differ between renders:
    compare everything else."""

    def stable(objects):
        text = [yaml.safe_dump(o.get("spec", o.get("data")), sort_keys=True) for o in objects]
        text = [re.sub(r"checksum/[\w-]+: \w+", "", s) for s in text]
        return sorted((o["kind"], o["metadata"]["name"], s) for o, s in zip(objects, text, strict=True) if o["kind"] != "Secret")

    assert stable(render_plane(snippet[0], helm="helm3")) == stable(plane)

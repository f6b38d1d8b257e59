"""The Helm chart rendered with helm 4 and helm 3: lint, Kubernetes schemas, bad values, and what the rendered
objects must guarantee (token only in a Secret, probes on the sentinel, checksums, per-group configuration,
the same Airflow configuration as the CLI helpers write)."""

from __future__ import annotations

import configparser
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import (
    CHART,
    KUBE_VERSIONS,
    VALUES_FILES,
    by_kind,
    load_values,
    render,
    run_helm,
    template,
    values_args,
)

pytestmark = pytest.mark.chart
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def pod_templates(objects):
    return [o for o in objects if o["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job")]


def containers(pod_spec):
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def agent_cfg(objects, statefulset) -> configparser.ConfigParser:
    (volume,) = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    (cm,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(cm["data"]["airflow.cfg"])
    return parser


# ------------------------------------------------------------------------------------------ lint, schemas


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_lint_strict(helm, values):
    result = run_helm(helm, "lint", "--strict", str(CHART), *values_args(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_rendered_objects_are_valid_kubernetes(helm, values):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    for kube_version in KUBE_VERSIONS:
        objects = render(values, helm=helm, kube_version=kube_version)
        assert pod_templates(objects)
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid for Kubernetes {kube_version}: {e}")


def test_validation_catches_a_broken_object():
    """The validation above can fail: a misspelled field in a rendered StatefulSet is refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    (sts, *_) = by_kind(render(VALUES_FILES[0]), "StatefulSet")
    broken = copy.deepcopy(sts)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_helm3_and_helm4_render_the_same(values):
    assert render(values, helm="helm3") == render(values, helm="helm4")


def _walk(values, schema, path=""):
    """Every key of values.yaml is declared in the schema, and every object in the schema refuses unknown keys."""
    if isinstance(values, dict) and schema.get("type") == "object" and "properties" in schema:
        assert schema.get("additionalProperties") is False, f"{path or 'values'}: unknown keys must fail"
        for key, value in values.items():
            assert key in schema["properties"], f"{path}{key} is not in values.schema.json"
            _walk(value, schema["properties"][key], f"{path}{key}.")
    elif isinstance(values, list) and "items" in schema:
        for i, item in enumerate(values):
            _walk(item, schema["items"], f"{path}[{i}].")


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    _walk(values, schema)
    for name in ("everything", "three-groups", "existing-secrets"):
        _walk(load_values(name), schema)


def test_values_are_documented():
    """Every top-level value in values.yaml has a comment right above it (or above its section)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z]\w*:", line):
            block = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                block.append(lines[j])
                j -= 1
            nested = any(ln.strip().startswith("# --") for ln in lines[i + 1 : i + 8])
            assert block or nested, f"values.yaml: {line.split(':')[0]} has no comment"


# ------------------------------------------------------------------------------------------ bad values

MINIMAL = {"apiUrl": "https://airflow.example.com", "token": {"existingSecret": "tokens"}}
BAD_VALUES = {
    "worker group without queues": ({"workers": [{"name": "gpu", "queues": []}]}, "workers/0/queues"),
    "worker group without queues key": ({"workers": [{"name": "gpu"}]}, "queues"),
    "concurrency 0": ({"workers": [{"name": "gpu", "queues": ["gpu"], "concurrency": 0}]}, "workers/0/concurrency"),
    "token given two ways": ({"token": {"existingSecret": "tokens", "values": {"default-0": "rex_x"}}},
                             "token is given two ways"),
    "unknown key": ({"replicaCount": 3}, "replicaCount"),
    "unknown key in a worker group": ({"workers": [{"name": "a", "queues": ["a"], "replica": 2}]}, "replica"),
    "no apiUrl": ({"apiUrl": ""}, "apiUrl"),
    "no token": ({"token": {"existingSecret": ""}}, "token.existingSecret"),
    "a missing token value": ({"token": {"existingSecret": "", "values": {"other-0": "rex_x"}}},
                              "token.values.default-0"),
    "grace below shutdown timeout": ({"shutdownTimeout": 600}, "terminationGracePeriodSeconds"),
    "a group's grace below shutdown timeout": (
        {"workers": [{"name": "a", "queues": ["a"], "terminationGracePeriodSeconds": 10}]},
        "workers[0].terminationGracePeriodSeconds"),
    "group name used twice": ({"workers": [{"name": "a", "queues": ["a"]}, {"name": "a", "queues": ["b"]}]},
                              "workers[1].name"),
    "reserved group name": ({"workers": [{"name": "triggerer", "queues": ["a"]}]}, "workers/0/name"),
    "queue with a comma": ({"workers": [{"name": "a", "queues": ["a,b"]}]}, "workers/0/queues/0"),
    "vault approle without role id": ({"secretsBackend": {"backend": "vault", "vault": {
        "url": "https://vault:8200", "authType": "approle"}}}, "secretsBackend.vault.roleId"),
    "token inside a repo url": ({"dagBundles": [{"name": "d", "type": "git",
                                                 "repoUrl": "https://u:secret@git.example.com/d.git"}]},
                                "dagBundles[0].repoUrl"),
    "bundle of an unknown type": ({"dagBundles": [{"name": "d", "type": "s3", "path": "/x"}]}, "dagBundles/0"),
    "xcom backend without path": ({"xcomBackend": {"enabled": True}}, "xcomBackend.path"),
    "no agent at all": ({"workers": []}, "workers is empty"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
@pytest.mark.parametrize("helm", ["helm4", "helm3"])
def test_bad_values_fail_naming_the_value(case, helm, tmp_path):
    override, expected = BAD_VALUES[case]
    values = {**MINIMAL, **override}
    result = template(values, helm=helm, check=False)
    assert result.returncode != 0, f"{case}: helm template accepted it"
    # helm 4 names a schema path /workers/0/queues, helm 3 workers.0.queues
    assert expected.replace("/", ".") in result.stderr.replace("/", "."), result.stderr


def test_minimal_values_render():
    """The bad-value cases above start from values that are fine."""
    assert by_kind(render(MINIMAL), "StatefulSet")


# ------------------------------------------------------------------------------------------ objects


@pytest.mark.parametrize("name", ["everything", "three-groups"])
def test_tokens_only_in_a_secret(name):
    values = load_values(name)
    objects = render(values)
    tokens = list(values["token"]["values"].values())
    (secret,) = by_kind(objects, "Secret")
    assert set(secret["stringData"].values()) == set(tokens)
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for token in tokens:
            assert token not in text, f"a token is in {obj['kind']} {obj['metadata']['name']}"
    for sts in by_kind(objects, "StatefulSet"):
        group = sts["metadata"]["labels"]["airflow-remote-execution/group"]
        spec = sts["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "tokens"]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        # The pod sees its group's tokens only, and reads its own one as token_file.
        assert [i["key"] for i in volume["secret"]["items"]] == [f"{group}-{n}" for n in range(sts["spec"]["replicas"])]
        for container in containers(spec):
            if container["name"] not in ("agent", "sentinel"):
                continue
            env = {e["name"]: e for e in container["env"]}
            assert env["AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE"]["value"] == (
                f"/var/run/secrets/airflow-agent/{group}-${{AGENT_ORDINAL}}")
            assert env["AGENT_ORDINAL"]["valueFrom"]["fieldRef"]["fieldPath"] == (
                "metadata.labels['apps.kubernetes.io/pod-index']")
            assert not [e for e in container["env"] if "value" in e and e["value"].startswith("rex_")]


def test_existing_token_secret_is_not_rendered():
    objects = render(load_values("existing-secrets"))
    assert not by_kind(objects, "Secret")
    (sts,) = by_kind(objects, "StatefulSet")
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tokens"]
    assert volume["secret"]["secretName"] == "airflow-agent-tokens"


@pytest.mark.parametrize("native", [True, False])
def test_probes_point_at_the_sentinel(native):
    values = {**load_values("three-groups"), "sentinel": {"nativeSidecar": native, "port": 9123}}
    for sts in by_kind(render(values), "StatefulSet"):
        spec = sts["spec"]["template"]["spec"]
        assert spec["shareProcessNamespace"] is True
        sidecars = [c for c in (spec.get("initContainers", []) if native else spec["containers"])
                    if c["name"] == "sentinel"]
        (sentinel,) = sidecars
        if native:
            assert sentinel["restartPolicy"] == "Always"
        assert sentinel["args"] == ["sentinel", "--host", "0.0.0.0", "--port", "9123"]
        assert sentinel["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 9123}
        (agent,) = [c for c in spec["containers"] if c["name"] == "agent"]
        assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 9123}
        assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9123}
        assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9123}
        # Agent and sentinel share the status file and the configuration.
        for c in (agent, sentinel):
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts["status"] == "/var/run/airflow-agent" and mounts["config"] == "/opt/airflow/config"
        cfg = agent_cfg(render(values), sts)
        assert cfg["remote_execution"]["sentinel_port"] == "9123"
        assert cfg["remote_execution"]["status_file"] == "/var/run/airflow-agent/status.json"


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_checksums_on_every_pod_template(values):
    objects = render(values)
    for workload in pod_templates(objects):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        for key in ("checksum/config", "checksum/tokens", "checksum/ca"):
            assert re.fullmatch(r"[0-9a-f]{32}", annotations.get(key, "")), f"{workload['metadata']['name']}: {key}"


def _checksums(values):
    return {s["metadata"]["name"]: s["spec"]["template"]["metadata"]["annotations"]
            for s in by_kind(render(values), "StatefulSet")}


def test_changed_config_or_token_rolls_the_pods():
    values = load_values("three-groups")
    before = _checksums(values)
    more = copy.deepcopy(values)
    more["workers"][1]["concurrency"] = 2
    after = _checksums(more)
    assert after["rel-agent-gpu"]["checksum/config"] != before["rel-agent-gpu"]["checksum/config"]
    assert after["rel-agent-default"]["checksum/config"] == before["rel-agent-default"]["checksum/config"]
    rotated = copy.deepcopy(values)
    rotated["token"]["values"]["gpu-0"] = "rex_rotated"
    assert all(_checksums(rotated)[n]["checksum/tokens"] != before[n]["checksum/tokens"] for n in before)
    shared = copy.deepcopy(values)
    shared["logging"] = {"logUploadInterval": 3}
    assert all(_checksums(shared)[n]["checksum/config"] != before[n]["checksum/config"] for n in before)


def test_each_group_gets_its_queues_and_concurrency():
    values = load_values("three-groups")
    objects = render(values)
    statefulsets = {s["metadata"]["labels"]["airflow-remote-execution/group"]: s for s in by_kind(objects, "StatefulSet")}
    assert set(statefulsets) == {w["name"] for w in values["workers"]}
    for group in values["workers"]:
        sts = statefulsets[group["name"]]
        assert sts["spec"]["replicas"] == group["replicas"]
        cfg = agent_cfg(objects, sts)
        assert cfg["remote_execution"]["queues"] == ",".join(group["queues"])
        assert cfg["remote_execution"]["concurrency"] == str(group["concurrency"])
        assert cfg["remote_execution"]["components"] == "worker"
        assert cfg["remote_execution"]["api_url"] == "https://airflow.example.com"
        assert "token" not in cfg["remote_execution"] and "token_file" not in cfg["remote_execution"]
        spec = sts["spec"]["template"]["spec"]
        grace = group.get("terminationGracePeriodSeconds") or 330
        assert spec["terminationGracePeriodSeconds"] == grace >= int(cfg["remote_execution"]["shutdown_timeout"])
        (pdb,) = [p for p in by_kind(objects, "PodDisruptionBudget") if p["metadata"]["name"] == sts["metadata"]["name"]]
        assert pdb["spec"]["selector"] == sts["spec"]["selector"]
    gpu = statefulsets["gpu"]["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"accelerator": "nvidia"} and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_dag_processor_and_triggerer_components():
    objects = render(load_values("everything"))
    statefulsets = {s["metadata"]["labels"]["app.kubernetes.io/component"] + "/" +
                    s["metadata"]["labels"]["airflow-remote-execution/group"]: s for s in by_kind(objects, "StatefulSet")}
    assert set(statefulsets) == {"worker/default", "worker/etl", "dag-processor/dag-processor", "triggerer/triggerer"}
    dp = agent_cfg(objects, statefulsets["dag-processor/dag-processor"])
    assert dp["remote_execution"]["components"] == "dag-processor"
    assert [b["name"] for b in json.loads(dp["dag_processor"]["dag_bundle_config_list"])] == ["team-a-dags"]
    worker = agent_cfg(objects, statefulsets["worker/default"])
    assert [b["name"] for b in json.loads(worker["dag_processor"]["dag_bundle_config_list"])] == [
        "team-a-dags", "shared-dags"]
    for name in ("dag-processor/dag-processor", "triggerer/triggerer"):
        # The sentinel reads the status file only the worker writes: these pods would never be healthy.
        spec = statefulsets[name]["spec"]["template"]["spec"]
        assert [c["name"] for c in containers(spec)] == ["wait-for-proxy", "agent", "log-forwarder"], name
        agent = spec["containers"][0]
        assert not {"startupProbe", "livenessProbe", "readinessProbe", "lifecycle"} & set(agent), name
        assert "shareProcessNamespace" not in spec
    trig = statefulsets["triggerer/triggerer"]["spec"]["template"]["spec"]["containers"][0]
    assert trig["args"] == ["agent", "triggerer", "--capacity", "500"]
    assert agent_cfg(objects, statefulsets["triggerer/triggerer"])["remote_execution"]["queues"] == "default"


def test_pods_are_locked_down_with_writable_volumes():
    objects = render(load_values("everything"))
    for sts in by_kind(objects, "StatefulSet"):
        spec = sts["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 50000
        assert spec["automountServiceAccountToken"] is False
        for c in containers(spec):
            if c["name"] not in ("agent", "sentinel"):
                continue
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert {"/tmp", "/opt/airflow/logs", "/var/run/airflow-agent", "/var/lib/airflow/dag_bundles"} <= mounts
        (agent,) = [c for c in spec["containers"] if c["name"] == "agent"]
        assert spec["terminationGracePeriodSeconds"] >= 600
        if sts["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
            assert "preStop" in agent["lifecycle"]


def test_workload_identity():
    objects = render(load_values("workload-identity"))
    (sa,) = by_kind(objects, "ServiceAccount")
    assert sa["metadata"]["name"] == "airflow-agent"
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/airflow-agent"}
    (sts,) = by_kind(objects, "StatefulSet")
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == "airflow-agent"
    objects = render(load_values("workload-identity-azure-gke"))
    (sts,) = by_kind(objects, "StatefulSet")
    assert sts["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


def test_existing_secrets_reach_the_containers():
    objects = render(load_values("existing-secrets"))
    (sts,) = by_kind(objects, "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    (agent,) = [c for c in spec["containers"] if c["name"] == "agent"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["AIRFLOW_CONN_GIT_DAGS"]["valueFrom"]["secretKeyRef"] == {"name": "git-dags-connection", "key": "connection"}
    assert env["AZURE_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "azure-sp", "key": "client-secret"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ca"]["secret"]["secretName"] == "plane-ca"
    assert volumes["client-cert"]["secret"]["secretName"] == "airflow-agent-mtls"
    cfg = agent_cfg(objects, sts)["remote_execution"]
    assert cfg["ca_bundle"] == "/etc/airflow-agent/ca/ca.crt"
    assert cfg["client_cert"] == "/etc/airflow-agent/client-cert/tls.crt"


def test_every_value_of_everything_reaches_the_pods():
    """The values no other test looks at: proxy, env and envFrom, pull secrets, priority class, annotations,
    topology spread, and the xcomBackend/logging/stateStoreBackend/openLineage options."""
    values = load_values("everything")
    objects = render(values)
    statefulsets = {s["metadata"]["labels"]["airflow-remote-execution/group"]: s for s in by_kind(objects, "StatefulSet")}
    for group, sts in statefulsets.items():
        spec = sts["spec"]["template"]["spec"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["priorityClassName"] == "airflow-agents"
        assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"} and spec["tolerations"] == values["tolerations"]
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "false"
        assert sts["spec"]["template"]["metadata"]["labels"]["cost-center"] == "data"
        agent = next(c for c in spec["containers"] if c["name"] == "agent")
        assert agent["image"] == "registry.example.com/airflow-agent:1.2.3" and agent["imagePullPolicy"] == "Always"
        env = {e["name"]: e.get("value") for e in agent["env"]}
        assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.internal:3128"
        assert env["NO_PROXY"] == "10.0.0.0/8,.svc" and env["TZ"] == "UTC"
        assert ("TEAM" in env) == (group == "default") and (annotations.get("team") == "platform") == (group == "default")
        assert agent["envFrom"] == [{"configMapRef": {"name": "agent-extra-env"}}]
        cfg = agent_cfg(objects, sts)
        assert cfg["core"]["xcom_backend"] == "airflow_remote_execution.xcom.ObjectStorageXComBackend"
        assert {k: cfg["remote_execution"][k] for k in ("xcom_path", "xcom_conn_id", "xcom_threshold",
                                                       "xcom_compression", "log_upload_interval")} == {
            "xcom_path": "s3://acme/xcom", "xcom_conn_id": "xcom_s3", "xcom_threshold": "1024",
            "xcom_compression": "zstd", "log_upload_interval": "5"}
        assert dict(cfg["logging"]) == {"logging_level": "DEBUG", "remote_logging": "True",
                                        "remote_base_log_folder": "s3://acme/logs", "remote_log_conn_id": "logs_s3"}
        assert cfg["workers"]["state_store_backend"] == "acme.state.S3StateBackend"
        assert cfg["openlineage"]["disabled"] == "False" and cfg["openlineage"]["namespace"] == "team-a"
        assert json.loads(cfg["openlineage"]["transport"]) == values["openLineage"]["transport"]
        assert cfg["remote_execution"]["request_timeout"] == "45"
    spread = by_kind(render(load_values("three-groups")), "StatefulSet")
    (analytics,) = [s for s in spread if s["metadata"]["name"].endswith("-analytics")]
    assert analytics["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["topologyKey"] == (
        "topology.kubernetes.io/zone")


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_rendered_options_are_known_to_airflow_or_the_provider(values):
    """A misspelled or renamed option would be silently ignored by the agent's Airflow."""
    from airflow.configuration import conf

    from airflow_remote_execution.get_provider_info import get_provider_info

    known = {s: set(d.get("options", {})) for s, d in conf.configuration_description.items()}
    for section, d in get_provider_info()["config"].items():
        known.setdefault(section, set()).update(d["options"])
    objects = render(values)
    for sts in by_kind(objects, "StatefulSet"):
        cfg = agent_cfg(objects, sts)
        for section in cfg.sections():
            unknown = set(cfg[section]) - known.get(section, set())
            assert not unknown, f"{sts['metadata']['name']}: [{section}] {sorted(unknown)}"


NO_WORKERS = {**MINIMAL, "workers": [], "dagProcessor": {"enabled": True}}


@pytest.mark.parametrize("values", [*VALUES_FILES, NO_WORKERS], ids=[*(p.stem for p in VALUES_FILES), "no-workers"])
def test_notes_render(values, tmp_path):
    """NOTES.txt renders at install (helm template does not print it) and names a pod that exists; a release
    with a dag processor and no worker group has no sentinel, so its notes name no probe."""
    result = run_helm("helm4", "install", "rel", str(CHART), "--dry-run=client", *values_args(values, tmp_path))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    pods = {o["metadata"]["name"] + "-0" for o in by_kind(render(values), "StatefulSet")}
    (logs_pod,) = re.findall(r"logs (\S+) -c agent", notes)
    assert logs_pod in pods
    assert ("/readyz" in notes) == (values is not NO_WORKERS)

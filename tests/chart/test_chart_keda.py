"""KEDA autoscaling in the chart: a ScaledObject and a TriggerAuthentication per worker group with
autoscaling.enabled, reading the plane's /remote_execution/metrics/scaling with a metrics token, scaling the
group's StatefulSet (no fixed replicas, scale to zero allowed, slow scale-in), and a token per possible
ordinal."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from .conftest import KUBE_VERSIONS, by_kind, render, template

pytestmark = pytest.mark.chart

VALUES = {
    "apiUrl": "https://airflow.example.com",
    "token": {"existingSecret": "tokens"},
    "keda": {"metricsToken": {"existingSecret": "keda-metrics-token"}},
    "workers": [
        {"name": "default", "queues": ["default"], "replicas": 1},
        {"name": "gpu", "queues": ["gpu", "gpu&large"], "concurrency": 2, "replicas": 1,
         "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 4}},
    ],
}


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
def test_a_scaled_object_per_autoscaled_group(helm):
    objects = render(VALUES, helm=helm)
    (scaled,) = by_kind(objects, "ScaledObject")
    (auth,) = by_kind(objects, "TriggerAuthentication")
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "rel-agent-gpu"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4)  # scale to zero allowed
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] == 300 and behavior["policies"][0]["value"] == 1

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    url = urlsplit(meta["url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == "https://airflow.example.com/remote_execution/metrics/scaling"
    assert parse_qs(url.query) == {"slots_per_agent": ["2"], "queues": ["gpu,gpu&large"]}
    assert (meta["valueLocation"], meta["targetValue"], meta["authMode"]) == ("total.suggested_agents", "1", "bearer")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"] == "rel-agent-gpu-metrics"
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "token", "name": "keda-metrics-token", "key": "token"}]

    statefulsets = {s["metadata"]["name"]: s for s in by_kind(objects, "StatefulSet")}
    assert "replicas" not in statefulsets["rel-agent-gpu"]["spec"]  # KEDA's decision survives helm upgrade
    assert statefulsets["rel-agent-default"]["spec"]["replicas"] == 1
    tokens = next(v for v in statefulsets["rel-agent-gpu"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tokens")
    assert [i["key"] for i in tokens["secret"]["items"]] == [f"gpu-{i}" for i in range(4)]  # every possible ordinal


def test_metrics_url_override_and_no_objects_without_autoscaling():
    values = {**VALUES, "keda": {**VALUES["keda"], "metricsUrl": "http://airflow-api.airflow.svc:8080/"}}
    (scaled,) = by_kind(render(values), "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["url"].startswith(
        "http://airflow-api.airflow.svc:8080/remote_execution/metrics/scaling?")
    plain = {**VALUES, "workers": [VALUES["workers"][0]]}
    objects = render(plain)
    assert not by_kind(objects, "ScaledObject") and not by_kind(objects, "TriggerAuthentication")


def test_token_values_must_cover_every_ordinal_up_to_max_replicas():
    values = {**VALUES, "token": {"values": {"default-0": "rex_a", "gpu-0": "rex_b"}}}
    result = template(values, check=False)
    assert result.returncode != 0 and "token.values.gpu-1" in result.stderr


@pytest.mark.parametrize("override, expected", [
    ({"keda": {"metricsToken": {"existingSecret": ""}}}, "keda.metricsToken.existingSecret"),
    ({"workers": [{"name": "gpu", "queues": ["gpu"], "autoscaling": {"enabled": True, "minReplicas": 5,
                                                                     "maxReplicas": 2}}]}, "minReplicas"),
    ({"workers": [{"name": "gpu", "queues": ["gpu"], "autoscaling": {"enabled": True, "max": 2}}]}, "max"),
    ({"keda": {"scaleDown": {"podsPerPeriod": 0}}}, "podsPerPeriod"),
])
def test_bad_autoscaling_values_fail_naming_the_value(override, expected):
    result = template({**VALUES, **override}, check=False)
    assert result.returncode != 0 and expected in result.stderr, result.stderr


def test_core_objects_stay_valid_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for kube_version in KUBE_VERSIONS:
        for obj in render(VALUES, kube_version=kube_version):
            if obj["apiVersion"].startswith("keda.sh/"):
                continue  # a custom resource: kubernetes-validate has no schema for it
            kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.mark.usefixtures("airflow_db")
def test_the_rendered_trigger_reads_the_plane_route():
    """KEDA's request, as rendered, answered by the real route: valueLocation finds a number."""
    from starlette.testclient import TestClient

    from airflow.utils.session import create_session

    from airflow_remote_execution.plane import metrics_tokens
    from airflow_remote_execution.plane.api.app import create_app

    (scaled,) = by_kind(render(VALUES), "ScaledObject")
    meta = scaled["spec"]["triggers"][0]["metadata"]
    url = urlsplit(meta["url"])
    with create_session() as s:
        token = metrics_tokens.create(s, name="keda")[0]
    with TestClient(create_app()) as client:
        r = client.get(url.path.removeprefix("/remote_execution") + "?" + url.query,
                       headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    value = r.json()
    for key in meta["valueLocation"].split("."):
        value = value[key]
    assert value == 0  # no work yet: scale to zero
    assert set(r.json()["queues"]) == {"gpu", "gpu&large"}

"""The agents' own Prometheus endpoint in the chart: ``metrics.enabled`` sets agent_metrics_port in the
worker groups' airflow.cfg, opens a named container port, adds the prometheus.io pod annotations, and
(``metrics.podMonitor.enabled``) a PodMonitor per worker group; off by default; values schema-checked."""

from __future__ import annotations

import configparser

import pytest

from .conftest import KUBE_VERSIONS, by_kind, render, template

pytestmark = pytest.mark.chart

VALUES = {
    "apiUrl": "https://airflow.example.com",
    "token": {"existingSecret": "tokens"},
    "triggerer": {"enabled": True},
    "metrics": {"enabled": True, "port": 9200, "podMonitor": {"enabled": True, "interval": "15s",
                                                               "labels": {"release": "kube-prometheus"}}},
    "workers": [{"name": "default", "queues": ["default"]}, {"name": "gpu", "queues": ["gpu"]}],
}


def cfg(objects: list[dict], name: str) -> configparser.ConfigParser:
    (config_map,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == f"{name}-config"]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(config_map["data"]["airflow.cfg"])
    return parser


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
def test_metrics_endpoint_port_annotations_and_pod_monitors(helm):
    objects = render(VALUES, helm=helm)
    sets = {s["metadata"]["name"]: s for s in by_kind(objects, "StatefulSet")}
    for group in ("default", "gpu"):
        name = f"rel-agent-{group}"
        section = cfg(objects, name)["remote_execution"]
        assert (section["agent_metrics_port"], section["agent_metrics_host"]) == ("9200", "0.0.0.0")
        pod = sets[name]["spec"]["template"]
        assert {k: v for k, v in pod["metadata"]["annotations"].items() if k.startswith("prometheus.io/")} == {
            "prometheus.io/scrape": "true", "prometheus.io/port": "9200", "prometheus.io/path": "/metrics"}
        (agent,) = [c for c in pod["spec"]["containers"] if c["name"] == "agent"]
        assert {"name": "metrics", "containerPort": 9200, "protocol": "TCP"} in agent["ports"]
    # The triggerer emits no agent metrics: no option, port or annotation there.
    triggerer = sets["rel-agent-triggerer"]["spec"]["template"]
    assert "agent_metrics_port" not in cfg(objects, "rel-agent-triggerer")["remote_execution"]
    assert not any(k.startswith("prometheus.io/") for k in triggerer["metadata"].get("annotations", {}))
    monitors = {m["metadata"]["name"]: m for m in by_kind(objects, "PodMonitor")}
    assert set(monitors) == {"rel-agent-default", "rel-agent-gpu"}
    gpu = monitors["rel-agent-gpu"]
    assert gpu["apiVersion"] == "monitoring.coreos.com/v1"
    assert gpu["metadata"]["labels"]["release"] == "kube-prometheus"
    assert gpu["spec"]["selector"]["matchLabels"] == {
        k: v for k, v in sets["rel-agent-gpu"]["spec"]["selector"]["matchLabels"].items()}
    assert gpu["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"},
        {"port": "sentinel", "path": "/metrics", "interval": "15s"},  # the sentinel's checks
    ]


def test_off_by_default_and_annotations_optional():
    base = {k: v for k, v in VALUES.items() if k != "metrics"}
    objects = render(base)
    assert not by_kind(objects, "PodMonitor")
    (pod,) = [s["spec"]["template"] for s in by_kind(objects, "StatefulSet") if s["metadata"]["name"] == "rel-agent-gpu"]
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"]["annotations"])
    assert "agent_metrics_port" not in cfg(objects, "rel-agent-gpu")["remote_execution"]
    objects = render({**base, "metrics": {"enabled": True, "annotations": False}})
    (pod,) = [s["spec"]["template"] for s in by_kind(objects, "StatefulSet") if s["metadata"]["name"] == "rel-agent-gpu"]
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"]["annotations"])
    assert cfg(objects, "rel-agent-gpu")["remote_execution"]["agent_metrics_port"] == "9108"
    assert not by_kind(objects, "PodMonitor")


@pytest.mark.parametrize("bad", [{"port": 0}, {"port": "9108"}, {"podMonitor": {"interval": "soon"}}, {"extra": 1}])
def test_schema_refuses_bad_metrics_values(bad):
    result = template({**VALUES, "metrics": {**VALUES["metrics"], **bad}}, check=False,
                      kube_version=KUBE_VERSIONS[-1])
    assert result.returncode != 0 and "metrics" in result.stderr, result.stderr

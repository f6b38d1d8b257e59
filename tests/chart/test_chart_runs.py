"""The chart runs: the agent image is built (on a Debian base made here with debootstrap), the chart is rendered
for a real plane (api-server and scheduler on PostgreSQL, over HTTPS, started on the host, with no DAG files
of its own), and its pods run as containers with `podman kube play`: two worker groups (one of two agents),
a dag processor and a triggerer. The chart's dag processor must send the plane the DAGs, agents must
register with their own tokens, run the example DAGs on the right worker groups (deferred tasks' triggers in
the triggerer pod), answer probes through their sentinels, and drain when their pods are deleted (preStop
hook, SIGTERM) with nothing lost.

podman (4.3) is not a cluster; tests/chart/podman_kube.py does what it lacks (the StatefulSet controller's
pods, decoded Secret volumes, per-pod emptyDirs, no restart of a container of a pod being deleted), and the
test runs the preStop hook itself. Its other limits, which the chart's values below work around: init
containers must exit (so the sentinel runs as an ordinary container, `sentinel.nativeSidecar: false`), and a
declared containerPort is published on the host (so `sentinel.declarePort: false`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from localplane import EXAMPLE_DAGS, Plane, fresh_pg_database, wait_for

from .conftest import ROOT, render
from .podman_kube import dump, pods_for_podman

pytestmark = [pytest.mark.e2e, pytest.mark.chart, pytest.mark.timeout(1500)]
TEST_DAGS = ROOT / "tests" / "e2e" / "dags"
CONTAINERS_CONF = ROOT / "images" / "containers.conf"
IMAGE = "localhost/airflow-remote-execution-agent:chart-e2e"
GROUPS = {"default": ("default", 2), "analytics": ("analytics,drain", 1)}  # group -> (token queues, replicas)


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image():
    for tool in ("podman", "debootstrap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/system-deps.sh installs it)")
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-agent-image.sh"), "--local-base", "--wheels", "cache", "--tag", IMAGE],
        capture_output=True, text=True, env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (info,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    size = info["Size"]
    assert info["Config"]["User"] == "50000", info["Config"]  # non-root, the official image's airflow user
    assert info["Config"]["Entrypoint"] == ["airflow", "remote-execution"], info["Config"]
    timings = [line for line in result.stderr.splitlines() if "timings" in line or "ready after" in line]
    print(f"agent image {IMAGE}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.1f} s; {timings}")
    return IMAGE


@pytest.fixture(scope="module")
def network():
    name = f"rex-chart-{uuid.uuid4().hex[:8]}"
    podman("network", "create", name)
    try:
        (info,) = json.loads(podman("network", "inspect", name).stdout)
        yield name, info["subnets"][0]["gateway"]
    finally:
        podman("network", "rm", "-f", name, check=False)


def _certificate(directory: Path, *ips: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for the plane, valid for each of ``ips``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chart-e2e-plane")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "plane.crt", directory / "plane.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def plane(pg_url, network, tmp_path_factory):
    base = tmp_path_factory.mktemp("chart-plane")
    dags = base / "dags"
    shutil.copytree(EXAMPLE_DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(TEST_DAGS / "remote_sleepy.py", dags)
    os.chmod(base, 0o755)
    # Pods reach the plane through the podman network's gateway, so the api-server listens beyond loopback,
    # over TLS (an agent is not ready while its token would cross the network in clear text).
    tls = _certificate(base / "tls", "127.0.0.1", network[1])
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "chart_e2e"), dags_folder=dags, tls=tls,
                  extra_env={"AIRFLOW__API__HOST": "0.0.0.0"})
    try:
        # No dag-processor on the plane: the chart's dag-processor pod parses the DAGs (the dags-folder bundle).
        plane.start(components=("api-server", "scheduler"))
        yield plane
    finally:
        plane.stop()
        for proc in plane.history:
            print(f"--- {proc.name}\n{proc.tail(30)}")


def _iso(value: str) -> dt.datetime:
    """An ISO timestamp from the plane or podman (which gives nanoseconds and may add a zone name)."""
    value = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    value = re.sub(r" ([+-]\d{4}) \w+$", r"\1", value)
    return dt.datetime.fromisoformat(value)


def test_chart_runs_against_a_real_plane(image, network, plane, tmp_path):
    net, gateway = network
    release = f"c{uuid.uuid4().hex[:6]}"
    tokens = {}
    for group, (queues, replicas) in GROUPS.items():
        for n in range(replicas):
            # --bundles: once an agent token may parse a bundle, the plane gives that bundle's work only to
            # tokens allowed the bundle.
            tokens[f"{group}-{n}"] = plane.create_agent_token(f"{release}-{group}-{n}", queues, "--bundles", "dags-folder")
    workers = {f"{release}-{key}" for key in tokens}  # the agents' names
    # The plane runs no triggerer: deferred tasks' triggers must run in the chart's triggerer pod.
    tokens["triggerer-0"] = plane.create_agent_token(f"{release}-triggerer-0", "default", "--bundles", "dags-folder")
    tokens["dag-processor-0"] = plane.create_agent_token(f"{release}-dag-processor-0", "default", "--bundles",
                                                         "dags-folder")
    values = {
        "apiUrl": f"https://{gateway}:{plane.port}",
        "caBundle": {"pem": plane.tls[0].read_text()},
        "image": {"repository": image.rsplit(":", 1)[0], "tag": image.rsplit(":", 1)[1], "pullPolicy": "Never"},
        "token": {"values": tokens},
        "shutdownTimeout": 60,
        "terminationGracePeriodSeconds": 90,
        "sentinel": {"nativeSidecar": False, "declarePort": False, "reportInterval": 5},
        "workers": [{"name": "default", "queues": ["default"], "replicas": 2, "concurrency": 4},
                    {"name": "analytics", "queues": ["analytics", "drain"], "replicas": 1, "concurrency": 2}],
        "triggerer": {"enabled": True, "capacity": 10},
        "dagProcessor": {"enabled": True},
        # The DAG files reach the agents as the dags-folder bundle, from a host directory.
        "extraVolumes": [{"name": "dags", "hostPath": {"path": str(plane.dags_folder), "type": "Directory"}}],
        "extraVolumeMounts": [{"name": "dags", "mountPath": "/opt/airflow/dags", "readOnly": True}],
    }
    objects = render(values, release=release)
    manifest = dump(pods_for_podman(objects, tmp_path / "secrets"), tmp_path / "play.yaml")
    pods = [o["metadata"]["name"] for o in yaml.safe_load_all(manifest.read_text()) if o["kind"] == "Pod"]
    assert sorted(pods) == sorted(f"{release}-agent-{t}" for t in tokens)
    worker_pods = [p for p in pods if "-triggerer-" not in p and "-dag-processor-" not in p]

    played = dt.datetime.now(dt.timezone.utc)
    try:
        podman("kube", "play", "--network", net, str(manifest))
        # The plane knows the DAGs only once the chart's dag-processor pod has parsed and sent them.
        plane.wait_dag("remote_fan_out_fan_in", timeout=300)
        print(f"kube play -> DAGs parsed by the dag-processor pod: "
              f"{(dt.datetime.now(dt.timezone.utc) - played).total_seconds():.1f} s")
        triggered = dt.datetime.now(dt.timezone.utc)
        fan_run = plane.trigger("remote_fan_out_fan_in")
        queues_run = plane.trigger("remote_two_queues")

        def all_registered():
            agents = plane.api("GET", "/remote_execution/v1/admin/agents").json()
            mine = {a["name"]: a for a in agents if a["name"] in workers and a["state"] == "active"}
            return mine if len(mine) == len(workers) else None

        agents = wait_for(all_registered, 240, "the chart's agents to register", 1)
        assert {a["name"]: sorted(a["queues"]) for a in agents.values()} == {
            f"{release}-default-0": ["default"], f"{release}-default-1": ["default"],
            f"{release}-analytics-0": ["analytics", "drain"]}

        assert plane.wait_run("remote_fan_out_fan_in", fan_run) == "success"
        assert plane.wait_run("remote_two_queues", queues_run) == "success"
        fan = plane.settled_work_items(dag_id="remote_fan_out_fan_in", run_id=fan_run)
        assert {w["agent_name"] for w in fan} <= {f"{release}-default-0", f"{release}-default-1"}
        assert len(fan) == 7 and {w["state"] for w in fan} == {"success"}
        by_task = {w["key"][2]: w["agent_name"] for w in plane.work_items(dag_id="remote_two_queues", run_id=queues_run)}
        assert by_task["transform"] == f"{release}-analytics-0"
        assert by_task["extract"].startswith(f"{release}-default-") and by_task["load"].startswith(f"{release}-default-")

        # Each agent's container start -> registered, and trigger -> its first lease.
        leases = [*fan, *plane.work_items(dag_id="remote_two_queues", run_id=queues_run)]
        for name, agent in sorted(agents.items()):
            container = f"{release}-agent-{name[len(release) + 1:]}-agent"
            started_at = _iso(json.loads(podman("inspect", container).stdout)[0]["State"]["StartedAt"])
            mine = [_iso(w["leased_at"]) for w in leases if w["agent_name"] == name and w.get("leased_at")]
            first = f"{(min(mine) - triggered).total_seconds():.1f} s" if mine else "none"
            print(f"{name}: container start -> registered {(_iso(agent['registered_at']) - started_at).total_seconds():.1f}"
                  f" s (kube play -> container start {(started_at - played).total_seconds():.1f} s); trigger -> its first lease {first}")

        # The containers run as rendered: non-root on a read-only root filesystem (the writable volumes suffice).
        for pod in pods:
            (container,) = json.loads(podman("inspect", f"{pod}-agent").stdout)
            assert container["HostConfig"]["ReadonlyRootfs"] is True, pod
            assert container["Config"]["User"].split(":")[0] == "50000", container["Config"]["User"]

        # The sentinel answers inside the pod, on the port the probes use: /healthz (liveness) and /readyz.
        def probe(pod: str, container: str, path: str) -> dict:
            code = ("import json, urllib.request as u, urllib.error as e\n"
                    f"try: r = u.urlopen('http://127.0.0.1:8990{path}', timeout=5)\n"
                    "except e.HTTPError as x: r = x\n"
                    "print(json.dumps({**json.loads(r.read()), 'http': r.status}))")
            result = podman("exec", f"{pod}-{container}", "python", "-c", code, check=False)
            return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr}

        for pod in worker_pods:
            last: dict = {}

            def healthy(pod=pod, last=last):
                last.clear()
                last.update(probe(pod, "sentinel", "/healthz"))
                return last.get("http") == 200 and last.get("healthy") is True

            try:
                wait_for(healthy, 60, f"{pod}: sentinel /healthz", 2)
            except TimeoutError:
                pytest.fail(f"{pod} not healthy: {last}")

            def ready(pod=pod, last=last):
                last.clear()
                last.update(probe(pod, "agent", "/readyz"))
                return last.get("http") == 200 and last.get("ready") is True

            try:
                wait_for(ready, 120, f"{pod}: /readyz", 2)
            except TimeoutError:
                pytest.fail(f"{pod} not ready: {[c for c in last.get('checks', []) if not c.get('ok')] or last}")

        # A deferred task's trigger runs in the triggerer pod (the plane has no triggerer), then it resumes.
        deferred_run = plane.trigger("remote_deferrable", {"wait_seconds": 5})
        assert plane.wait_run("remote_deferrable", deferred_run, timeout=240) == "success"
        deferred = plane.settled_work_items(dag_id="remote_deferrable", run_id=deferred_run)
        assert {w["agent_name"] for w in deferred} <= workers - {f"{release}-analytics-0"}
        assert {t["state"] for t in plane.task_instances("remote_deferrable", deferred_run)} == {"success"}

        # Scale-in: a task runs when the pods are deleted; it finishes, nothing is lost or retried. podman runs
        # no preStop hook and its `kube down` does not wait for the grace period (4.3: it took ~4 s with a
        # SIGTERM handler that needed 8), so the test does what the kubelet does on deletion: run the agent
        # container's preStop hook (as rendered), then SIGTERM with terminationGracePeriodSeconds to exit.
        nap_run = plane.trigger("remote_sleepy", {"seconds": 10})
        wait_for(lambda: [w for w in plane.work_items(dag_id="remote_sleepy", run_id=nap_run) if w["state"] == "running"],
                 120, "the nap to run", 0.5)
        (sts, *_) = [o for o in objects if o["kind"] == "StatefulSet"]
        spec = sts["spec"]["template"]["spec"]
        (agent_container,) = [c for c in spec["containers"] if c["name"] == "agent"]
        pre_stop = agent_container["lifecycle"]["preStop"]["exec"]["command"]
        grace = spec["terminationGracePeriodSeconds"]
        started = time.monotonic()

        def delete(pod: str) -> str:
            t0 = time.monotonic()
            if pod not in worker_pods:  # the triggerer's and dag processor's pods have no preStop hook
                podman("pod", "stop", "--time", str(grace), pod, check=False, timeout=grace + 30)
                return f"{pod}: stopped in {time.monotonic() - t0:.1f} s"
            hook = podman("exec", f"{pod}-agent", *pre_stop, check=False, timeout=grace + 10)
            t1 = time.monotonic()
            podman("pod", "stop", "--time", str(grace), pod, check=False, timeout=grace + 30)
            return (f"{pod}: preStop exit {hook.returncode} after {t1 - t0:.1f} s {hook.stderr.strip()[-300:]!r}, "
                    f"stopped {time.monotonic() - t1:.1f} s later")

        with ThreadPoolExecutor(len(pods)) as pool:
            print("\n".join(pool.map(delete, pods)))
        print(f"preStop + SIGTERM (drain) of {len(pods)} pods took {time.monotonic() - started:.1f} s")
        assert plane.wait_run("remote_sleepy", nap_run, timeout=120) == "success"
        (nap,) = plane.task_instances("remote_sleepy", nap_run)
        assert nap["try_number"] == 1 and nap["state"] == "success"
        assert [w["state"] for w in plane.work_items(dag_id="remote_sleepy", run_id=nap_run)] == ["success"]
        states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()
                  if a["name"] in workers}
        assert set(states.values()) == {"offline"}, states
        for pod in worker_pods:  # each agent drained and exited by itself, with 0
            exited = json.loads(podman("inspect", f"{pod}-agent").stdout)[0]["State"]
            assert (exited["Running"], exited["ExitCode"]) == (False, 0), (pod, exited)
            log = podman("logs", f"{pod}-agent").stderr + podman("logs", f"{pod}-agent").stdout
            assert "Stopping: no new work" in log and log.count(" registered: ") == 1, log[-2000:]
    finally:
        for pod in pods:
            for container in ("agent", "sentinel"):
                logs = podman("logs", f"{pod}-{container}", check=False)
                print(f"--- {pod}/{container}\n" + "\n".join((logs.stdout + logs.stderr).splitlines()[-25:]))
        podman("kube", "down", str(manifest), check=False, timeout=200)
        for pod in pods:
            podman("pod", "rm", "-f", "-t", "0", pod, check=False)

"""
A local orchestration plane and agents as real processes on loopback.

Used by the quickstart (``scripts/demo.py``), the end-to-end tests and the benchmarks, so all three
exercise the same setup a user gets: stock ``airflow api-server``, ``scheduler`` and
``dag-processor`` with ``RemoteExecutor``, and agents in their own AIRFLOW_HOME with no database.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DAGS = ROOT / "example_dags"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
# An agent gets a database URL that cannot work: any attempt to use a DB fails loudly.
NO_DB = "sqlite:////nonexistent/agents-have-no-metadata-db.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"Timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class PostgresCluster:
    """A throwaway PostgreSQL cluster from the installed server binaries (run as user postgres if root)."""

    def __init__(self, base: Path):
        self.base = base
        self.data = base / "pgdata"
        self.sock = base / "pgsock"
        self.port = free_port()
        self.started = False

    def _run(self, args: list[str]) -> None:
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.base / "pg.log"), "-w", "start"])
        self.started = True
        self._run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "airflow"])
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/airflow"

    def stop(self) -> None:
        if self.started:
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
            self.started = False


@dataclass
class Plane:
    """api-server + scheduler (+ dag-processor) with RemoteExecutor, in ``home``."""

    home: Path
    db_url: str | None = None
    executor: str = "airflow_remote_execution.executors.RemoteExecutor"
    dags_folder: Path = EXAMPLE_DAGS
    extra_env: dict[str, str] = field(default_factory=dict)
    tls: tuple[Path, Path] | None = None  # (certificate, key): serve the api-server over HTTPS
    port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    history: list[Proc] = field(default_factory=list)  # every process started, also the stopped ones

    def __post_init__(self):
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.home / "logs-processes"
        self.logs.mkdir(exist_ok=True)
        self.db_url = self.db_url or f"sqlite:///{self.home / 'airflow.db'}"
        (self.home / "passwords.json").write_text(json.dumps({"admin": "admin"}))
        secret_file = self.home / "jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(64))
        fernet_file = self.home / "fernet_key"
        if not fernet_file.exists():
            from cryptography.fernet import Fernet

            fernet_file.write_text(Fernet.generate_key().decode())
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "32",
            "AIRFLOW__CORE__FERNET_KEY": fernet_file.read_text(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text(),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "5",
            **self.extra_env,
        }
        if self.tls:
            self.env["AIRFLOW__API__SSL_CERT"], self.env["AIRFLOW__API__SSL_KEY"] = map(str, self.tls)
        self.verify: str | bool = str(self.tls[0]) if self.tls else True
        self._token: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def airflow(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def start(self, components=("api-server", "scheduler", "dag-processor")) -> Plane:
        self.airflow("db", "migrate")
        for name in components:
            self.start_component(name)
        self.wait_healthy()
        return self

    def start_component(self, name: str) -> Proc:
        proc = Proc(name, [AIRFLOW, name], self.env, self.logs)
        self.procs[name] = proc
        self.history.append(proc)
        return proc

    def stop_component(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc:
            if sig == signal.SIGKILL:
                proc.signal(sig)
            proc.stop()

    def wait_healthy(self, timeout: float = 120) -> None:
        def ok():
            api = self.procs.get("api-server")
            if api and not api.alive():
                raise RuntimeError(f"api-server exited:\n{api.tail()}")
            return requests.get(f"{self.url}/api/v2/monitor/health", timeout=2, verify=self.verify).status_code == 200

        wait_for(ok, timeout, "api-server health")

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_component(name)

    # ---------------------------------------------------------------- REST helpers

    def token(self) -> str:
        if self._token is None:
            r = requests.post(
                f"{self.url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=10, verify=self.verify
            )
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        """Call the plane's REST API as admin. A 500 is retried a few times: on SQLite, Airflow's
        api-server answers "database is locked" that way while the scheduler writes."""
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        timeout = kwargs.pop("timeout", 30)
        for attempt in range(5):
            response = requests.request(
                method, f"{self.url}{path}", headers=headers, timeout=timeout, verify=self.verify, **kwargs
            )
            if response.status_code != 500:
                break
            time.sleep(0.5 * (attempt + 1))
        return response

    def create_agent_token(self, name: str, queues: str, *extra: str) -> str:
        out = self.airflow("remote-execution", "tokens", "create", "--name", name, "--queues", queues, "--output", "json", *extra)
        return json.loads(out.stdout.strip().splitlines()[-1])["token"]

    def wait_dag(self, dag_id: str, timeout: float = 180) -> None:
        wait_for(lambda: self.api("GET", f"/api/v2/dags/{dag_id}").status_code == 200, timeout, f"DAG {dag_id} parsed", 0.5)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.wait_dag(dag_id)
        self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        r = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        def done():
            state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]
            return state if state in ("success", "failed") else None

        return wait_for(done, timeout, f"run {dag_id}/{run_id}", 0.5)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        r = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        r.raise_for_status()
        return r.json()["task_instances"]

    def work_items(self, **params) -> list[dict]:
        r = self.api("GET", "/remote_execution/v1/admin/work", params=params)
        r.raise_for_status()
        return r.json()

    def settled_work_items(self, timeout: float = 30, **params) -> list[dict]:
        """Work items once none is running: an agent reports when Airflow's supervisor exits,
        which can be seconds after the task itself finished."""

        def settled():
            items = self.work_items(**params)
            return items if items and all(w["state"] != "running" for w in items) else None

        return wait_for(settled, timeout, "the agents' reports")


@dataclass
class Agent:
    """``airflow remote-execution agent start`` in its own AIRFLOW_HOME with only the API URL and a token."""

    name: str
    home: Path
    api_url: str
    token: str
    concurrency: int = 4
    dags_folder: Path = EXAMPLE_DAGS
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None

    def __post_init__(self):
        self.home.mkdir(parents=True, exist_ok=True)
        token_file = self.home / "agent-token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": NO_DB,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__REMOTE_EXECUTION__API_URL": self.api_url,
            "AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE": str(token_file),
            "AIRFLOW__REMOTE_EXECUTION__CONCURRENCY": str(self.concurrency),
            "AIRFLOW__REMOTE_EXECUTION__SHUTDOWN_TIMEOUT": "30",
            **self.extra_env,
        }

    def start(self) -> Agent:
        self.proc = Proc(f"agent-{self.name}", [AIRFLOW, "remote-execution", "agent", "start"], self.env, self.home)
        return self

    def wait_registered(self, timeout: float = 90) -> None:
        def ok():
            if not self.proc.alive():
                raise RuntimeError(f"agent {self.name} exited:\n{self.proc.tail()}")
            return "registered" in self.proc.log_path.read_text(errors="replace")

        wait_for(ok, timeout, f"agent {self.name} registered")

    def stop(self) -> int | None:
        return self.proc.stop(60) if self.proc else None

    def kill(self) -> None:
        """SIGKILL the agent and everything under it (runners, supervisors, tasks), as a node death would."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def shutdown(plane: Plane, agents=(), lines: int = 40) -> None:
    """Stop agents, then the plane; print the end of every process's log (what a failed test needs)."""
    agents = [a for a in agents if a is not None]
    for agent in agents:
        agent.stop()
    plane.stop()
    for proc in [*plane.history, *(a.proc for a in agents if a.proc)]:
        print(f"--- {proc.name}\n{proc.tail(lines)}")


def fresh_pg_database(server_url: str, name: str) -> str:
    """Create (or recreate) database ``name`` on the server of ``server_url``; return its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``host``; returns (cert, key) PEM paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "plane.crt", directory / "plane.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path

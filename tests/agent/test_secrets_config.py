"""
``secrets configure`` builders and Airflow's real secrets backends on real or protocol-level servers:
moto (AWS Secrets Manager), OpenBao (Vault API: token and AppRole auth), and the fake Azure Key Vault
and GCP Secret Manager of ``tests/secret_servers.py`` driven by the real client libraries.

Each backend is built the way the Task SDK builds it on an agent: ``[workers] secrets_backend`` /
``secrets_backend_kwargs`` (+ per-key env overrides) -> ``get_custom_secret_backend(worker_mode=True)``.
"""

from __future__ import annotations

import json

import boto3
import hvac
import pytest

from airflow_remote_execution.agent.checks import CheckOptions, run_checks
from airflow_remote_execution.agent.secrets_config import (
    KWARG_ENV_PREFIX,
    SecretsConfigError,
    SecretsOptions,
    build,
    write,
)
from emulators import AWS_TEST_CREDENTIALS, OPENBAO_ROOT_TOKEN, moto, openbao

CONN = {"conn_type": "postgres", "host": "db.internal", "login": "app", "password": "s3cr3t-pw", "port": 5432}
CONN_URI = "postgres://app:s3cr3t-pw@db.internal:5432"


def use_backend(monkeypatch, config, **kwarg_env: str) -> object:
    """Configure the process like an agent's airflow.cfg would and build the backend as the Task SDK does."""
    from airflow.sdk.configuration import get_custom_secret_backend

    monkeypatch.setenv("AIRFLOW__WORKERS__SECRETS_BACKEND", config.class_path)
    monkeypatch.setenv("AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS", config.kwargs_json)
    for key, value in kwarg_env.items():
        monkeypatch.setenv(KWARG_ENV_PREFIX + key.upper(), value)
    return get_custom_secret_backend(worker_mode=True)


def assert_resolves(backend, conn_id: str = "warehouse", var: str = "greeting", value: str = "hello from the backend"):
    conn = backend.get_connection(conn_id)
    assert (conn.conn_type, conn.host, conn.login, conn.password, conn.port) == (
        "postgres",
        "db.internal",
        "app",
        "s3cr3t-pw",
        5432,
    )
    assert backend.get_variable(var) == value
    assert backend.get_variable("not-there") is None


# ------------------------------------------------------------------ builders: output and validation


def test_vault_approle_config_names_env_not_values(tmp_path):
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text("the-secret-id")
    config = build(
        SecretsOptions(
            "vault",
            url="https://vault:8200/",
            auth_type="approle",
            role_id="r-1",
            secret_id_file=str(secret_id_file),
            connections_prefix="airflow/conns",
        )
    )
    assert config.class_path == "airflow.providers.hashicorp.secrets.vault.VaultBackend"
    assert config.kwargs == {
        "connections_path": "airflow/conns",
        "variables_path": "variables",
        "mount_point": "secret",
        "kv_engine_version": 2,
        "url": "https://vault:8200",
        "auth_type": "approle",
        "role_id": "r-1",
    }
    assert config.env == {KWARG_ENV_PREFIX + "SECRET_ID": f'"$(cat {secret_id_file})"'}
    printed = config.as_ini() + config.as_env() + config.env_lines()
    assert "the-secret-id" not in printed
    assert printed.startswith("[workers]\nsecrets_backend = airflow.providers.hashicorp.secrets.vault.VaultBackend\n")
    assert json.loads(config.as_ini().split("secrets_backend_kwargs = ", 1)[1]) == config.kwargs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            SecretsOptions("vault", url="https://v", auth_type="approle"),
            "--role-id is required for --auth-type approle",
        ),
        (SecretsOptions("vault"), "--url is required for --backend vault"),
        (SecretsOptions("vault", url="vault:8200"), "--url 'vault:8200' is not a http(s)://host URL"),
        (SecretsOptions("vault", url="https://v", auth_type="ldap"), "--auth-type 'ldap': use one of token, approle"),
        (SecretsOptions("vault", url="https://v", auth_type="kubernetes"), "--kubernetes-role is required"),
        (SecretsOptions("vault", url="https://v", token_file="relative/token"), "must be an absolute path"),
        (SecretsOptions("vault", url="https://v", token_file="/nonexistent/token"), "does not exist"),
        (SecretsOptions("azure"), "--vault-url is required for --backend azure"),
        (SecretsOptions("azure", vault_url="http://kv.vault.azure.net"), "is not a https://host URL"),
        (SecretsOptions("azure", vault_url="https://kv", tenant_id="t"), "needs both --tenant-id and --client-id"),
        (SecretsOptions("azure", vault_url="https://kv", variables_prefix="a_b"), "only letters, digits and '-'"),
        (SecretsOptions("gcp"), "--project-id is required for --backend gcp"),
        (SecretsOptions("gcp", project_id="My Project"), "is not a GCP project id"),
        (SecretsOptions("aws", role_arn="my-role"), "is not an ARN"),
        (SecretsOptions("onprem"), "Unknown backend 'onprem'"),
    ],
)
def test_bad_input_says_what_to_fix(options, message):
    with pytest.raises(SecretsConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        build(options)


def test_other_backends_config():
    aws = build(SecretsOptions("aws", region="eu-west-1", role_arn="arn:aws:iam::123456789012:role/airflow"))
    assert aws.kwargs == {
        "connections_prefix": "airflow/connections",
        "variables_prefix": "airflow/variables",
        "region_name": "eu-west-1",
        "role_arn": "arn:aws:iam::123456789012:role/airflow",
    }
    azure = build(SecretsOptions("azure", vault_url="https://kv.vault.azure.net", tenant_id="t", client_id="c"))
    assert azure.kwargs["vault_url"] == "https://kv.vault.azure.net"
    assert azure.env["AZURE_CLIENT_SECRET"].startswith("<") and "client_secret" not in azure.kwargs
    gcp = build(SecretsOptions("gcp", project_id="my-project-1"))
    assert gcp.kwargs == {
        "connections_prefix": "airflow-connections",
        "variables_prefix": "airflow-variables",
        "project_id": "my-project-1",
    }
    k8s = build(SecretsOptions("vault", url="https://vault", auth_type="kubernetes", kubernetes_role="airflow"))
    assert k8s.kwargs["kubernetes_role"] == "airflow"
    assert k8s.kwargs["kubernetes_jwt_path"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"


def test_a_percent_in_a_kwarg_is_written_as_airflow_reads_it(tmp_path):
    """Airflow interpolates airflow.cfg: a literal '%' is '%%' there (unescaped, Airflow could not read the
    option at all: "'%' must be followed by '%' or '('"), and as-is in an environment variable."""
    import configparser

    config = build(SecretsOptions("aws", region="eu-west-1", connections_prefix="team%a/conns"))
    cfg = tmp_path / "airflow.cfg"
    write(config, cfg)
    for text in (cfg.read_text(), config.as_ini()):
        parser = configparser.ConfigParser()  # as AirflowConfigParser: BasicInterpolation
        parser.read_string(text)
        assert json.loads(parser.get("workers", "secrets_backend_kwargs"))["connections_prefix"] == "team%a/conns"
    assert "team%a/conns" in config.as_env()


def test_write_keeps_the_rest_of_airflow_cfg(tmp_path):
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(
        "[core]\n# a comment that must survive\ndags_folder = /dags\n\n"
        "[workers]\n# secrets_backend =\nmin_heartbeat_interval = 5\nsecrets_backend = old.Backend\n\n"
        "[logging]\nbase_log_folder = /logs\n"
    )
    config = build(SecretsOptions("vault", url="https://vault:8200", token_file=str(cfg)))
    write(config, cfg)
    text = cfg.read_text()
    assert "# a comment that must survive" in text and "# secrets_backend =" in text
    assert "old.Backend" not in text and text.count("secrets_backend = ") == 1
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    assert parser.get("workers", "min_heartbeat_interval") == "5"
    assert parser.get("logging", "base_log_folder") == "/logs"
    assert json.loads(parser.get("workers", "secrets_backend_kwargs"))["token_path"] == str(cfg)
    new = tmp_path / "new" / "airflow.cfg"
    write(config, new)
    assert new.read_text().startswith("[workers]\nsecrets_backend = airflow.providers.hashicorp")


def test_cli_prints_and_writes(tmp_path, capsys):
    """Through Airflow's own CLI parser (in-process: the argparse wiring and the handler)."""
    from airflow.cli import cli_parser

    def cli(*args: str) -> str:
        parsed = cli_parser.get_parser().parse_args(["remote-execution", "secrets", "configure", *args])
        parsed.func(parsed)
        return capsys.readouterr().out

    out = cli(
        "--backend",
        "vault",
        "--url",
        "https://vault:8200",
        "--auth-type",
        "approle",
        "--role-id",
        "r-1",
        "--format",
        "env",
    )
    assert "AIRFLOW__WORKERS__SECRETS_BACKEND=airflow.providers.hashicorp.secrets.vault.VaultBackend" in out
    assert "export AIRFLOW__WORKERS__SECRETS_BACKEND_KWARG__SECRET_ID=<the AppRole secret id" in out
    with pytest.raises(SystemExit, match="--role-id is required for --auth-type approle"):
        cli("--backend", "vault", "--url", "https://v", "--auth-type", "approle")
    cfg = tmp_path / "airflow.cfg"
    out = cli("--backend", "gcp", "--project-id", "my-project-1", "--write", "--config-file", str(cfg))
    assert out.startswith(f"Wrote [workers] secrets_backend (gcp) to {cfg}")
    assert '"project_id": "my-project-1"' in cfg.read_text()


# ------------------------------------------------------------------ AWS Secrets Manager on moto


@pytest.fixture(scope="module")
def moto_server():
    with moto() as server:
        yield server


def test_aws_secrets_manager_resolves_connection_and_variable(moto_server, monkeypatch):
    sm = boto3.client("secretsmanager", endpoint_url=moto_server.url, **AWS_TEST_CREDENTIALS)
    sm.create_secret(Name="team-a/connections/warehouse", SecretString=json.dumps(CONN))
    sm.create_secret(Name="team-a/variables/greeting", SecretString="hello from the backend")
    config = build(
        SecretsOptions(
            "aws",
            connections_prefix="team-a/connections",
            variables_prefix="team-a/variables",
            region="us-east-1",
            endpoint_url=moto_server.url,
        )
    )
    # Credentials are the agent's (normally IRSA/instance profile); here Airflow's per-key env overrides.
    backend = use_backend(monkeypatch, config, aws_access_key_id="testing", aws_secret_access_key="testing")
    assert_resolves(backend)


# ------------------------------------------------------------------ HashiCorp Vault API on OpenBao


@pytest.fixture(scope="module")
def bao():
    with openbao() as server:
        client = hvac.Client(url=server.url, token=OPENBAO_ROOT_TOKEN)
        client.secrets.kv.v2.create_or_update_secret("connections/warehouse", secret={"conn_uri": CONN_URI})
        client.secrets.kv.v2.create_or_update_secret("variables/greeting", secret={"value": "hello from the backend"})
        client.sys.create_or_update_policy("airflow-read", 'path "secret/data/*" { capabilities = ["read"] }')
        client.sys.enable_auth_method("approle")
        client.auth.approle.create_or_update_approle("airflow-agent", token_policies=["airflow-read"])
        yield server, client


def test_vault_token_auth_from_a_token_file(bao, tmp_path, monkeypatch):
    server, _ = bao
    token_file = tmp_path / "vault-token"
    token_file.write_text(OPENBAO_ROOT_TOKEN)
    config = build(SecretsOptions("vault", url=server.url, token_file=str(token_file)))
    assert_resolves(use_backend(monkeypatch, config))


def test_vault_approle_secret_id_from_env_override(bao, monkeypatch):
    server, client = bao
    role_id = client.auth.approle.read_role_id("airflow-agent")["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id("airflow-agent")["data"]["secret_id"]
    config = build(SecretsOptions("vault", url=server.url, auth_type="approle", role_id=role_id))
    assert secret_id not in config.as_ini()
    backend = use_backend(monkeypatch, config, secret_id=secret_id)
    assert_resolves(backend)
    assert backend.vault_client.client.auth.token.lookup_self()["data"]["policies"] == ["airflow-read", "default"]

    wrong = use_backend(monkeypatch, config, secret_id="not-the-secret-id")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        wrong.get_variable("greeting")


def test_vault_kubernetes_auth(bao, test_ca, tmp_path, monkeypatch):
    """No Kubernetes here: OpenBao's real kubernetes auth method asks a fake TokenReview API (the one
    Kubernetes call it makes); the backend logs in with the service account token file."""
    from secret_servers import FakeKubernetesAPI, service_account_jwt

    server, client = bao
    sa_token = service_account_jwt("airflow", "airflow-agent")
    jwt_file = tmp_path / "sa-token"
    jwt_file.write_text(sa_token)
    with FakeKubernetesAPI(test_ca.issue("127.0.0.1"), {sa_token: ("airflow", "airflow-agent")}) as k8s:
        client.sys.enable_auth_method("kubernetes")
        client.write(
            "auth/kubernetes/config",
            kubernetes_host=k8s.url,
            kubernetes_ca_cert=test_ca.path.read_text(),
            token_reviewer_jwt=k8s.reviewer_jwt,
            disable_local_ca_jwt=True,
        )
        client.write(
            "auth/kubernetes/role/airflow",
            bound_service_account_names="airflow-agent",
            bound_service_account_namespaces="airflow",
            token_policies="airflow-read",
        )
        config = build(
            SecretsOptions(
                "vault",
                url=server.url,
                auth_type="kubernetes",
                kubernetes_role="airflow",
                kubernetes_jwt_path=str(jwt_file),
            )
        )
        backend = use_backend(monkeypatch, config)
        vault = backend.vault_client
        assert (vault.auth_type, vault.kubernetes_role, vault.kubernetes_jwt_path) == (
            "kubernetes",
            "airflow",
            str(jwt_file),
        )
        assert_resolves(backend)
        assert k8s.reviews == [(sa_token, True)]

        revoked = tmp_path / "revoked-sa-token"  # right claims, but the cluster no longer accepts it
        revoked.write_text(service_account_jwt("airflow", "airflow-agent"))
        refused = use_backend(
            monkeypatch,
            build(
                SecretsOptions(
                    "vault",
                    url=server.url,
                    auth_type="kubernetes",
                    kubernetes_role="airflow",
                    kubernetes_jwt_path=str(revoked),
                )
            ),
        )
        with pytest.raises(hvac.exceptions.VaultError):
            refused.get_variable("greeting")
        assert k8s.reviews[-1] == (revoked.read_text(), False)


# ------------------------------------------------------------------ the doctor's secrets check


def test_doctor_secrets_check(bao, tmp_path, monkeypatch):
    server, _ = bao
    token_file = tmp_path / "vault-token"
    token_file.write_text(OPENBAO_ROOT_TOKEN)
    config = build(SecretsOptions("vault", url=server.url, token_file=str(token_file)))
    use_backend(monkeypatch, config)

    (found,) = run_checks(["secrets"], CheckOptions(probe_conn="warehouse", probe_var="greeting"))
    assert (found.status, found.detail) == (
        "PASS",
        "VaultBackend: connection 'warehouse' found (conn_type postgres); variable 'greeting' found",
    )
    assert "s3cr3t" not in found.detail and "hello" not in found.detail
    (missing,) = run_checks(["secrets"], CheckOptions(probe_var="nope"))
    assert missing.status == "PASS" and "variable 'nope' not found in the backend" in missing.detail
    (plain,) = run_checks(["secrets"])
    assert (plain.status, plain.detail) == ("PASS", "VaultBackend: answered a probe lookup")

    token_file.write_text("not-a-valid-token")
    (denied,) = run_checks(["secrets"], CheckOptions(probe_var="greeting"))
    assert denied.status == "FAIL" and "Vault Authentication Error" in denied.detail and "credentials" in denied.hint

    unreachable = build(SecretsOptions("vault", url="http://127.0.0.1:9", token_file=str(token_file)))
    use_backend(monkeypatch, unreachable)
    (down,) = run_checks(["secrets"])
    assert down.status == "FAIL" and "cannot reach the secrets backend" in down.hint, down

    monkeypatch.setenv("AIRFLOW__WORKERS__SECRETS_BACKEND", "airflow.providers.nowhere.secrets.Backend")
    (broken,) = run_checks(["secrets"])
    assert broken.status == "FAIL" and "cannot load airflow.providers.nowhere.secrets.Backend" in broken.detail

    monkeypatch.delenv("AIRFLOW__WORKERS__SECRETS_BACKEND")
    (skipped,) = run_checks(["secrets"])
    assert skipped.status == "SKIP"


# ------------------------------------------------------------------ Azure Key Vault and GCP Secret Manager (fakes)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    from secret_servers import TestCA

    return TestCA(tmp_path_factory.mktemp("secrets-ca"))


@pytest.fixture
def no_cloud_env(monkeypatch):
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "grpc_proxy",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "MSI_ENDPOINT",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)


def test_azure_key_vault_with_managed_identity(test_ca, monkeypatch, no_cloud_env):
    """azure-keyvault-secrets meets the vault's bearer challenge, gets a token from the (App Service)
    managed identity endpoint and reads the secrets; the vault is reached by its real host name."""
    from secret_servers import FakeKeyVault, RedirectingProxy

    stored = {"airflow-connections-warehouse": CONN_URI, "airflow-variables-greeting": "hello from the backend"}
    with (
        FakeKeyVault(test_ca.issue("*.vault.azure.net"), stored) as vault,
        RedirectingProxy({"*.vault.azure.net": ("127.0.0.1", vault.https.port)}) as proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        for name, value in vault.identity_env().items():
            monkeypatch.setenv(name, value)
        config = build(
            SecretsOptions("azure", vault_url="https://airflow-agents.vault.azure.net", ca_bundle=str(test_ca.path))
        )
        backend = use_backend(monkeypatch, config)
        assert_resolves(backend)
    assert vault.challenges >= 1 and vault.token_requests[0]["resource"] == ["https://vault.azure.net"]
    assert vault.reads[:2] == ["airflow-connections-warehouse", "airflow-variables-greeting"]
    assert set(proxy.tunnels) == {"airflow-agents.vault.azure.net:443"}


def test_gcp_secret_manager_over_grpc(test_ca, tmp_path, monkeypatch, no_cloud_env):
    """google-cloud-secret-manager's gRPC client with a service account key file reaches
    secretmanager.googleapis.com (through grpc_proxy) and authenticates with its signed JWT."""
    from secret_servers import FakeSecretManager, RedirectingProxy, service_account_key

    key_file = tmp_path / "sa.json"
    key = service_account_key(key_file, "airflow-project-1")
    stored = {
        "projects/airflow-project-1/secrets/airflow-connections-warehouse": CONN_URI,
        "projects/airflow-project-1/secrets/airflow-variables-greeting": "hello from the backend",
    }
    with (
        FakeSecretManager(test_ca.issue("secretmanager.googleapis.com"), key.public_key(), stored) as sm,
        RedirectingProxy({"secretmanager.googleapis.com": ("127.0.0.1", sm.port)}) as proxy,
    ):
        monkeypatch.setenv("grpc_proxy", proxy.url)
        monkeypatch.setenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", str(test_ca.path))
        config = build(SecretsOptions("gcp", project_id="airflow-project-1", key_file=str(key_file)))
        backend = use_backend(monkeypatch, config)
        assert_resolves(backend)
    assert sm.reads[:2] == [
        "projects/airflow-project-1/secrets/airflow-connections-warehouse",
        "projects/airflow-project-1/secrets/airflow-variables-greeting",
    ]
    assert set(proxy.tunnels) == {"secretmanager.googleapis.com:443"}

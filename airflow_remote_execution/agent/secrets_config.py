"""
Builders for an agent's ``[workers] secrets_backend`` configuration: the customer's secrets backend
(AWS Secrets Manager, Azure Key Vault, GCP Secret Manager, HashiCorp Vault/OpenBao) that the Task SDK
asks first for connections and variables, so they never pass through the plane.

Only names, URLs and file paths go into the configuration. Secret values (a Vault AppRole secret id,
an Azure client secret) are read from environment variables the operator sets from their own secret
store; this module names those variables with placeholders and never sees the values.
"""

from __future__ import annotations

import configparser
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SECTION = "workers"
BACKENDS = {
    "aws": "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend",
    "azure": "airflow.providers.microsoft.azure.secrets.key_vault.AzureKeyVaultBackend",
    "gcp": "airflow.providers.google.cloud.secrets.secret_manager.CloudSecretManagerBackend",
    "vault": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
}
PROVIDERS = {
    "aws": "apache-airflow-providers-amazon",
    "azure": "apache-airflow-providers-microsoft-azure",
    "gcp": "apache-airflow-providers-google",
    "vault": "apache-airflow-providers-hashicorp",
}
# Each backend's own defaults, so a printed config shows where it looks.
DEFAULT_PREFIXES = {
    "aws": ("airflow/connections", "airflow/variables"),
    "azure": ("airflow-connections", "airflow-variables"),
    "gcp": ("airflow-connections", "airflow-variables"),
    "vault": ("connections", "variables"),
}
VAULT_AUTH_TYPES = ("token", "approle", "kubernetes")
K8S_SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
KWARG_ENV_PREFIX = "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARG__"  # Airflow's per-key override of the JSON


class SecretsConfigError(ValueError):
    """Invalid ``secrets configure`` input; the message says what to change."""


@dataclass
class SecretsOptions:
    """What ``airflow remote-execution secrets configure`` was given (all optional but ``backend``)."""

    backend: str
    connections_prefix: str | None = None
    variables_prefix: str | None = None
    # aws
    region: str | None = None
    role_arn: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    # azure
    vault_url: str | None = None
    tenant_id: str | None = None
    client_id: str | None = None
    managed_identity_client_id: str | None = None
    # gcp
    project_id: str | None = None
    key_file: str | None = None
    # vault
    url: str | None = None
    auth_type: str = "token"
    token_file: str | None = None
    role_id: str | None = None
    secret_id_file: str | None = None
    kubernetes_role: str | None = None
    kubernetes_jwt_path: str = K8S_SA_TOKEN
    auth_mount_point: str | None = None
    mount_point: str = "secret"
    kv_version: int = 2
    # aws, azure, vault: the CA bundle that verifies the backend's TLS certificate
    ca_bundle: str | None = None


@dataclass
class SecretsBackendConfig:
    """The result: a backend class, its JSON kwargs, and environment variables the operator must set."""

    backend: str
    class_path: str
    kwargs: dict
    env: dict[str, str] = field(default_factory=dict)  # name -> placeholder/shell expression (never a value)
    notes: list[str] = field(default_factory=list)

    @property
    def kwargs_json(self) -> str:
        return json.dumps(self.kwargs, separators=(", ", ": "))

    @property
    def kwargs_ini(self) -> str:
        """The kwargs as an airflow.cfg value: Airflow interpolates ``%``, so a literal one is ``%%``."""
        return self.kwargs_json.replace("%", "%%")

    def as_ini(self) -> str:
        return f"[{SECTION}]\nsecrets_backend = {self.class_path}\nsecrets_backend_kwargs = {self.kwargs_ini}\n"

    def as_env(self) -> str:
        lines = [
            f"AIRFLOW__WORKERS__SECRETS_BACKEND={self.class_path}",
            f"AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS='{self.kwargs_json}'",
        ]
        return "\n".join(lines) + "\n"

    def env_lines(self) -> str:
        return "".join(f"export {name}={value}\n" for name, value in self.env.items())


def _need(value: str | None, flag: str, why: str) -> str:
    if not value or not value.strip():
        raise SecretsConfigError(f"{flag} is required {why}")
    return value.strip()


def _url(value: str | None, flag: str, why: str, https_only: bool = False) -> str:
    value = _need(value, flag, why)
    if not re.match(r"^https?://[^/\s]+", value) or (https_only and not value.startswith("https://")):
        scheme = "https://" if https_only else "http(s)://"
        raise SecretsConfigError(f"{flag} {value!r} is not a {scheme}host URL")
    return value.rstrip("/")


def _file(path: str | None, flag: str, must_exist: bool) -> str | None:
    """Absolute path of a file the agent reads at run time; checked here if it must exist on this host."""
    if not path:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        raise SecretsConfigError(f"{flag} {path!r} must be an absolute path (the agent reads it at run time)")
    if must_exist and not resolved.is_file():
        raise SecretsConfigError(f"{flag} {path} does not exist or is not a file")
    return str(resolved)


def _prefixes(opts: SecretsOptions) -> tuple[str, str]:
    conn_default, var_default = DEFAULT_PREFIXES[opts.backend]
    return (opts.connections_prefix or conn_default), (opts.variables_prefix or var_default)


def build(opts: SecretsOptions, *, check_files: bool = True) -> SecretsBackendConfig:
    """Validate ``opts`` and build the backend configuration; ``check_files`` checks paths exist here."""
    if opts.backend not in BACKENDS:
        raise SecretsConfigError(f"Unknown backend {opts.backend!r}: use one of {', '.join(BACKENDS)}")
    builder = {"aws": _aws, "azure": _azure, "gcp": _gcp, "vault": _vault}[opts.backend]
    config = SecretsBackendConfig(opts.backend, BACKENDS[opts.backend], {})
    conn_prefix, var_prefix = _prefixes(opts)
    builder(opts, config, conn_prefix, var_prefix, check_files)
    return config


def _aws(opts: SecretsOptions, config: SecretsBackendConfig, conn: str, var: str, check_files: bool) -> None:
    config.kwargs.update(connections_prefix=conn, variables_prefix=var)
    if opts.region:
        config.kwargs["region_name"] = opts.region
    if opts.role_arn:
        if not opts.role_arn.startswith("arn:"):
            raise SecretsConfigError(f"--role-arn {opts.role_arn!r} is not an ARN (arn:aws:iam::<account>:role/<name>)")
        config.kwargs["role_arn"] = opts.role_arn
    if opts.profile:
        config.kwargs["profile_name"] = opts.profile
    if opts.endpoint_url:
        config.kwargs["endpoint_url"] = _url(opts.endpoint_url, "--endpoint-url", "")
    if opts.ca_bundle:
        config.kwargs["verify"] = _file(opts.ca_bundle, "--ca-bundle", check_files)
    config.notes.append(
        "Credentials come from the standard AWS chain on the agent (IRSA/pod identity, instance profile, "
        "AWS_* environment variables or the profile); none are written here."
    )


def _azure(opts: SecretsOptions, config: SecretsBackendConfig, conn: str, var: str, check_files: bool) -> None:
    vault_url = _url(opts.vault_url, "--vault-url", "for --backend azure (https://<name>.vault.azure.net)", True)
    for flag, prefix in (("--connections-prefix", conn), ("--variables-prefix", var)):
        if not re.fullmatch(r"[0-9a-zA-Z-]+", prefix):
            raise SecretsConfigError(f"{flag} {prefix!r}: Key Vault secret names allow only letters, digits and '-'")
    config.kwargs.update(connections_prefix=conn, variables_prefix=var, vault_url=vault_url)
    if opts.managed_identity_client_id:
        config.kwargs["managed_identity_client_id"] = opts.managed_identity_client_id
    if opts.ca_bundle:
        config.kwargs["connection_verify"] = _file(opts.ca_bundle, "--ca-bundle", check_files)
    if opts.tenant_id or opts.client_id:
        if not (opts.tenant_id and opts.client_id):
            raise SecretsConfigError("A service principal needs both --tenant-id and --client-id")
        # DefaultAzureCredential reads these; the secret stays out of airflow.cfg.
        config.env.update(
            AZURE_TENANT_ID=opts.tenant_id,
            AZURE_CLIENT_ID=opts.client_id,
            AZURE_CLIENT_SECRET="<the service principal's client secret, from your secret store>",
        )
    else:
        config.notes.append(
            "Credentials: DefaultAzureCredential on the agent (workload identity, managed identity, or "
            "AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET)."
        )


def _gcp(opts: SecretsOptions, config: SecretsBackendConfig, conn: str, var: str, check_files: bool) -> None:
    project = _need(opts.project_id, "--project-id", "for --backend gcp")
    if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", project):
        raise SecretsConfigError(
            f"--project-id {project!r} is not a GCP project id (6-30 lowercase letters, digits, -)"
        )
    for flag, prefix in (("--connections-prefix", conn), ("--variables-prefix", var)):
        if not re.fullmatch(r"[a-zA-Z0-9_-]+", prefix):
            raise SecretsConfigError(f"{flag} {prefix!r}: Secret Manager ids allow only letters, digits, '-' and '_'")
    config.kwargs.update(connections_prefix=conn, variables_prefix=var, project_id=project)
    if opts.key_file:
        config.kwargs["gcp_key_path"] = _file(opts.key_file, "--key-file", check_files)
    else:
        config.notes.append(
            "Credentials: Application Default Credentials on the agent (workload identity, "
            "GOOGLE_APPLICATION_CREDENTIALS or the metadata server)."
        )


def _vault(opts: SecretsOptions, config: SecretsBackendConfig, conn: str, var: str, check_files: bool) -> None:
    url = _url(opts.url, "--url", "for --backend vault (the Vault/OpenBao address, e.g. https://vault:8200)")
    if opts.auth_type not in VAULT_AUTH_TYPES:
        raise SecretsConfigError(f"--auth-type {opts.auth_type!r}: use one of {', '.join(VAULT_AUTH_TYPES)}")
    if opts.kv_version not in (1, 2):
        raise SecretsConfigError(f"--kv-version {opts.kv_version}: the KV engine version is 1 or 2")
    kwargs: dict = {
        "connections_path": conn.strip("/"),
        "variables_path": var.strip("/"),
        "mount_point": opts.mount_point,
        "kv_engine_version": opts.kv_version,
        "url": url,
        "auth_type": opts.auth_type,
    }
    if opts.auth_mount_point:
        kwargs["auth_mount_point"] = opts.auth_mount_point
    if opts.ca_bundle:
        kwargs["verify"] = _file(opts.ca_bundle, "--ca-bundle", check_files)
    if opts.auth_type == "token":
        if opts.token_file:
            kwargs["token_path"] = _file(opts.token_file, "--token-file", check_files)
        else:
            config.env["VAULT_TOKEN"] = "<a Vault token, from your secret store>"
            config.notes.append("No --token-file: the backend reads the token from VAULT_TOKEN.")
    elif opts.auth_type == "approle":
        kwargs["role_id"] = _need(opts.role_id, "--role-id", "for --auth-type approle")
        secret_id_file = _file(opts.secret_id_file, "--secret-id-file", check_files)
        # Airflow's VaultBackend takes the secret id only as a value: pass it in Airflow's per-key
        # environment override, read from the file when the agent starts.
        config.env[KWARG_ENV_PREFIX + "SECRET_ID"] = (
            f'"$(cat {secret_id_file})"' if secret_id_file else "<the AppRole secret id, from your secret store>"
        )
    else:  # kubernetes
        kwargs["kubernetes_role"] = _need(opts.kubernetes_role, "--kubernetes-role", "for --auth-type kubernetes")
        kwargs["kubernetes_jwt_path"] = _file(opts.kubernetes_jwt_path, "--kubernetes-jwt-path", False)
        config.notes.append(
            "Kubernetes auth logs in with the pod's service account token "
            f"({kwargs['kubernetes_jwt_path']}); bind that service account to the Vault role."
        )
    config.kwargs.update(kwargs)


def write(config: SecretsBackendConfig, cfg_path: Path) -> None:
    """Set ``[workers] secrets_backend`` and ``secrets_backend_kwargs`` in ``cfg_path``, keeping every
    other line (comments included); other ``[workers]`` options stay as they are."""
    values = {"secrets_backend": config.class_path, "secrets_backend_kwargs": config.kwargs_ini}
    lines = cfg_path.read_text().splitlines() if cfg_path.exists() else []
    header = re.compile(r"^\s*\[([^\]]+)\]\s*$")
    start = next(
        (i for i, line in enumerate(lines) if (m := header.match(line)) and m.group(1).strip() == SECTION), None
    )
    if start is None:
        lines += (
            ([""] if lines and lines[-1].strip() else []) + [f"[{SECTION}]"] + [f"{k} = {v}" for k, v in values.items()]
        )
    else:
        end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])), len(lines))
        for key, value in values.items():
            option = re.compile(rf"^{re.escape(key)}\s*[=:]")
            found = next((i for i in range(start + 1, end) if option.match(lines[i])), None)
            if found is not None:
                lines[found] = f"{key} = {value}"
            else:
                insert_at = end
                while insert_at > start + 1 and not lines[insert_at - 1].strip():
                    insert_at -= 1
                lines.insert(insert_at, f"{key} = {value}")
                end += 1
    text = "\n".join(lines) + "\n"
    parser = configparser.ConfigParser(strict=False)  # interpolating, as Airflow reads the file
    try:
        parser.read_string(text)
        parser.get(SECTION, "secrets_backend_kwargs")
    except configparser.Error as e:
        raise SecretsConfigError(f"{cfg_path} would not parse after the edit ({e}); fix it by hand") from None
    if parser.get(SECTION, "secrets_backend_kwargs") != config.kwargs_json:
        raise SecretsConfigError(f"{cfg_path}: [{SECTION}] did not take the new values; check for duplicates")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text)

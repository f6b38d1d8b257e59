"""``airflow remote-execution ...`` commands, registered through provider info (``cli``)."""

from __future__ import annotations

from airflow.cli.cli_config import ARG_OUTPUT, ActionCommand, Arg, GroupCommand, lazy_load_command

_CMD = "airflow_remote_execution.cli.commands."

ARG_NAME = Arg(("--name",), help="Agent name the token belongs to (the agent's identity)", required=True)
ARG_QUEUES = Arg(("--queues",), help="Comma-separated queues the agent may serve", required=True)
ARG_EXPIRES_IN = Arg(("--expires-in",), help="Lifetime such as 30d, 12h or 90m (default: no expiry)")
ARG_DESCRIPTION = Arg(("--description",), help="Free text shown in `tokens list`")
ARG_BUNDLES = Arg(
    ("--bundles",), help="Comma-separated DAG bundles the agent's dag processor may write (default: none)"
)
ARG_TOKEN_ID = Arg(("token_id",), help="Token id (the part after 'rex_', shown by `tokens list`)")
ARG_AGENT_FILTER = Arg(("--agent-name",), help="Only this agent's tokens")
ARG_STATE = Arg(("--state",), help="Only work items in this state")
ARG_LIMIT = Arg(("--limit",), help="At most this many rows", type=int, default=100)
ARG_AGENT_QUEUES = Arg(("--queues",), help="Override [remote_execution] queues for this agent")
ARG_AGENT_NAME = Arg(("name",), help="Agent name (see `agents list`)")
ARG_FORCE = Arg(("--force",), help="Remove even if the agent looks alive", action="store_true")
ARG_OLD_VALID_FOR = Arg(
    ("--old-valid-for",), help="Overlap: the old token expires this long from now (e.g. 1h); default: until revoked"
)
ARG_CONCURRENCY = Arg(("--concurrency",), help="Override [remote_execution] concurrency", type=int)
ARG_COMPONENTS = Arg(
    ("--components",),
    help="Comma-separated components to run: worker, dag-processor, triggerer (default: the components option, worker)",
)

TOKEN_COMMANDS = (
    ActionCommand(
        name="create",
        help="Create an agent token and print it once",
        func=lazy_load_command(_CMD + "tokens_create"),
        args=(ARG_NAME, ARG_QUEUES, ARG_EXPIRES_IN, ARG_DESCRIPTION, ARG_BUNDLES, ARG_OUTPUT),
    ),
    ActionCommand(
        name="list",
        help="List agent tokens (never their secrets)",
        func=lazy_load_command(_CMD + "tokens_list"),
        args=(ARG_AGENT_FILTER, ARG_OUTPUT),
    ),
    ActionCommand(
        name="rotate",
        help="Create a new token for the same agent and queues; the old one stays valid for the overlap",
        func=lazy_load_command(_CMD + "tokens_rotate"),
        args=(ARG_TOKEN_ID, ARG_EXPIRES_IN, ARG_OLD_VALID_FOR, ARG_OUTPUT),
    ),
    ActionCommand(
        name="revoke",
        help="Revoke an agent token",
        func=lazy_load_command(_CMD + "tokens_revoke"),
        args=(ARG_TOKEN_ID,),
    ),
)

AGENTS_COMMANDS = (
    ActionCommand(
        name="list",
        help="List registered agents",
        func=lazy_load_command(_CMD + "agents_list"),
        args=(ARG_OUTPUT,),
    ),
    ActionCommand(
        name="drain",
        help="Let an agent finish its work and lease nothing new (it stays up) until resumed",
        func=lazy_load_command(_CMD + "agents_drain"),
        args=(ARG_AGENT_NAME, Arg(("--reason",), help="Why: shown in `agents list`, the admin API and the UI")),
    ),
    ActionCommand(
        name="resume",
        help="Let a drained agent lease work again",
        func=lazy_load_command(_CMD + "agents_resume"),
        args=(ARG_AGENT_NAME,),
    ),
    ActionCommand(
        name="remove",
        help="Forget a stopped or lost agent",
        func=lazy_load_command(_CMD + "agents_remove"),
        args=(ARG_AGENT_NAME, ARG_FORCE),
    ),
)

WORK_COMMANDS = (
    ActionCommand(
        name="list",
        help="List work items (newest first) and the agent that took each",
        func=lazy_load_command(_CMD + "work_list"),
        args=(ARG_STATE, ARG_LIMIT, ARG_OUTPUT),
    ),
)

AGENT_COMMANDS = (
    ActionCommand(
        name="triggerer",
        help="Run the agent's triggerer: claim triggers of deferred tasks in its queues and run them here",
        func=lazy_load_command("airflow_remote_execution.cli.triggerer_command.agent_triggerer"),
        args=(
            ARG_AGENT_QUEUES,
            Arg(("--capacity",), help="Most triggers to run at once (default: [triggerer] capacity)", type=int),
        ),
    ),
    ActionCommand(
        name="start",
        help="Start the agent worker: long-poll the plane for work and run it with the Task SDK",
        func=lazy_load_command("airflow_remote_execution.cli.agent_command.agent_start"),
        args=(ARG_AGENT_QUEUES, ARG_CONCURRENCY, ARG_COMPONENTS),
    ),
    ActionCommand(
        name="dag-processor",
        help="Run only the agent's dag processor: parse this agent's DAG bundles and send the results to the plane",
        func=lazy_load_command("airflow_remote_execution.cli.agent_command.agent_dag_processor"),
        args=(),
    ),
)

# --- secrets configure and the doctor (customer side) ---
_SEC = "airflow_remote_execution.cli.secrets_commands."
SECRETS_CONFIGURE_ARGS = (
    Arg(("--backend",), help="Secrets backend the agent reads first", choices=("aws", "azure", "gcp", "vault"),
        required=True),
    Arg(("--connections-prefix",), help="Where connections live (default: the backend's own)"),
    Arg(("--variables-prefix",), help="Where variables live (default: the backend's own)"),
    Arg(("--region",), help="aws: region of Secrets Manager"),
    Arg(("--role-arn",), help="aws: IAM role to assume for reading secrets"),
    Arg(("--profile",), help="aws: named profile on the agent"),
    Arg(("--endpoint-url",), help="aws: Secrets Manager endpoint (VPC endpoint)"),
    Arg(("--vault-url",), help="azure: https://<name>.vault.azure.net"),
    Arg(("--tenant-id",), help="azure: service principal tenant (its secret goes in AZURE_CLIENT_SECRET)"),
    Arg(("--client-id",), help="azure: service principal client id"),
    Arg(("--managed-identity-client-id",), help="azure: user-assigned managed identity"),
    Arg(("--project-id",), help="gcp: project holding the secrets"),
    Arg(("--key-file",), help="gcp: service account key file on the agent (default: ADC)"),
    Arg(("--url",), help="vault: Vault/OpenBao address"),
    Arg(("--auth-type",), help="vault: token, approle or kubernetes", choices=("token", "approle", "kubernetes"),
        default="token"),
    Arg(("--token-file",), help="vault token auth: file holding the token (default: VAULT_TOKEN)"),
    Arg(("--role-id",), help="vault approle: role id"),
    Arg(("--secret-id-file",), help="vault approle: file holding the secret id (read by the agent's start-up)"),
    Arg(("--kubernetes-role",), help="vault kubernetes auth: Vault role"),
    Arg(("--kubernetes-jwt-path",), help="vault kubernetes auth: service account token file",
        default="/var/run/secrets/kubernetes.io/serviceaccount/token"),
    Arg(("--auth-mount-point",), help="vault: mount point of the auth method if not the default"),
    Arg(("--mount-point",), help="vault: KV mount point (default: secret)", default="secret"),
    Arg(("--kv-version",), help="vault: KV engine version (default: 2)", type=int, default=2),
    Arg(("--ca-bundle",), help="aws/azure/vault: CA bundle that verifies the backend's certificate"),
    Arg(("--format",), help="Print as airflow.cfg lines (ini) or environment variables (env)",
        choices=("ini", "env"), default="ini"),
    Arg(("--write",), help="Write into $AIRFLOW_HOME/airflow.cfg instead of printing", action="store_true"),
    Arg(("--config-file",), help="With --write: this file instead of $AIRFLOW_HOME/airflow.cfg"),
)
SECRETS_COMMANDS = (
    ActionCommand(
        name="configure",
        help="Print (or --write) the agent's [workers] secrets_backend for AWS, Azure, GCP or Vault",
        func=lazy_load_command(_SEC + "secrets_configure"),
        args=SECRETS_CONFIGURE_ARGS,
    ),
)
CHECK_COMMAND = ActionCommand(
    name="check",
    help="Doctor: check this agent's plane connection, token, clock, secrets backend, disk (exit 1 on failure)",
    func=lazy_load_command("airflow_remote_execution.cli.check_command.check"),
    args=(
        Arg(("--only",), help="Comma-separated checks to run (default: all)"),
        Arg(("--probe-conn",), help="secrets: look up this connection id in the secrets backend"),
        Arg(("--probe-var",), help="secrets: look up this variable in the secrets backend"),
        ARG_OUTPUT,
    ),
)


_BUNDLES = "airflow_remote_execution.cli.bundles_commands."
ARG_BUNDLE_NAME = Arg(("name",), help="Bundle name (also its directory name in the bundle storage)")
ARG_REPO_URL = Arg(("--repo-url",), help="Repository URL (https://... or git@...); default: the connection's host")
ARG_TRACKING_REF = Arg(("--tracking-ref",), help="Branch, tag or commit to follow (default: main)", default="main")
ARG_SUBDIR = Arg(("--subdir",), help="Directory of the DAG files inside the repository")
ARG_GIT_CONN_ID = Arg(
    ("--conn-id",), help="Git connection: HTTPS token as its password, or SSH key_file/private_key in its extra"
)
ARG_REFRESH_INTERVAL = Arg(
    ("--refresh-interval",), help="Seconds between refreshes (default: [dag_processor] refresh_interval)", type=int
)
ARG_SUBMODULES = Arg(("--submodules",), help="Also fetch git submodules", action="store_true")
ARG_LOCAL_PATH = Arg(("--path",), help="Directory holding the DAG files", required=True)
ARG_WRITE = Arg(
    ("--write",), help="Add it to [dag_processor] dag_bundle_config_list in airflow.cfg instead of printing it",
    action="store_true",
)
ARG_SKIP_CHECKS = Arg(("--skip-checks",), help="Do not validate (connection, repository, path) first", action="store_true")
ARG_OFFLINE = Arg(("--offline",), help="Do not contact repositories", action="store_true")
ARG_GIT_TIMEOUT = Arg(("--timeout",), help="Seconds to wait for each repository (default: 30)", type=float, default=30.0)

BUNDLES_COMMANDS = (
    ActionCommand(
        name="add-git",
        help="Build (and check) a GitDagBundle entry; print it, or --write it into airflow.cfg",
        func=lazy_load_command(_BUNDLES + "bundles_add_git"),
        args=(ARG_BUNDLE_NAME, ARG_REPO_URL, ARG_TRACKING_REF, ARG_SUBDIR, ARG_GIT_CONN_ID, ARG_REFRESH_INTERVAL,
              ARG_SUBMODULES, ARG_WRITE, ARG_SKIP_CHECKS),
    ),
    ActionCommand(
        name="add-local",
        help="Build (and check) a LocalDagBundle entry; print it, or --write it into airflow.cfg",
        func=lazy_load_command(_BUNDLES + "bundles_add_local"),
        args=(ARG_BUNDLE_NAME, ARG_LOCAL_PATH, ARG_REFRESH_INTERVAL, ARG_WRITE, ARG_SKIP_CHECKS),
    ),
    ActionCommand(
        name="list",
        help="Show the configured dag bundles",
        func=lazy_load_command(_BUNDLES + "bundles_list"),
        args=(ARG_OUTPUT,),
    ),
    ActionCommand(
        name="validate",
        help="Check the configured dag bundles (keys, classes, connections, repositories, refs, paths); exit 1 on errors",
        func=lazy_load_command(_BUNDLES + "bundles_validate"),
        args=(ARG_OFFLINE, ARG_GIT_TIMEOUT),
    ),
    ActionCommand(
        name="remove",
        help="Remove a dag bundle from [dag_processor] dag_bundle_config_list in airflow.cfg",
        func=lazy_load_command(_BUNDLES + "bundles_remove"),
        args=(ARG_BUNDLE_NAME,),
    ),
)

SENTINEL_COMMAND = ActionCommand(
    name="sentinel",
    help="Serve /healthz and /readyz beside an agent and report its status to the plane (customer side)",
    func=lazy_load_command("airflow_remote_execution.cli.sentinel_command.sentinel"),
    args=(
        Arg(("--port",), help="Probe port (default: the sentinel_port option, 8990)", type=int),
        Arg(("--host",), help="Probe address (default: the sentinel_host option, 127.0.0.1)"),
        Arg(
            ("--report-interval",),
            help="Seconds between reports to the plane (default: the sentinel_report_interval option, 15)",
            type=float,
        ),
    ),
)


XCOM_COMMANDS = (
    ActionCommand(
        name="gc",
        help="Delete objects under the xcom_path option that no XCom references any more (run on an agent)",
        func=lazy_load_command("airflow_remote_execution.cli.xcom_commands.xcom_gc"),
        args=(
            Arg(("--older-than",), help="Only objects older than this (e.g. 7d); newer ones may be mid-task",
                required=True),
            Arg(("--dry-run",), help="List what would be deleted, delete nothing", action="store_true"),
            ARG_OUTPUT,
        ),
    ),
)

_METRICS = "airflow_remote_execution.cli.metrics_commands."
METRICS_TOKEN_COMMANDS = (
    ActionCommand(
        name="create",
        help="Create a read-only token for the fleet metrics and autoscaling routes (KEDA, Prometheus)",
        func=lazy_load_command(_METRICS + "metrics_tokens_create"),
        args=(Arg(("--name",), help="Who reads with it (e.g. keda, prometheus)", required=True), ARG_EXPIRES_IN,
              ARG_DESCRIPTION, ARG_OUTPUT),
    ),
    ActionCommand(
        name="list", help="List metrics tokens (never their secrets)",
        func=lazy_load_command(_METRICS + "metrics_tokens_list"), args=(ARG_OUTPUT,),
    ),
    ActionCommand(
        name="revoke", help="Revoke a metrics token",
        func=lazy_load_command(_METRICS + "metrics_tokens_revoke"),
        args=(Arg(("token_id",), help="Token id (the part after 'rexm_', shown by `metrics-tokens list`)"),),
    ),
)


def get_cli_commands() -> list[GroupCommand]:
    return [
        GroupCommand(
            name="remote-execution",
            help="Remote Execution: agent tokens, agents, work items, and the agent itself",
            subcommands=(
                GroupCommand(name="tokens", help="Manage agent tokens (plane)", subcommands=TOKEN_COMMANDS),
                GroupCommand(name="agents", help="Inspect agents (plane)", subcommands=AGENTS_COMMANDS),
                GroupCommand(name="work", help="Inspect work items (plane)", subcommands=WORK_COMMANDS),
                GroupCommand(name="metrics-tokens", help="Read-only tokens for fleet metrics and autoscaling (plane)",
                             subcommands=METRICS_TOKEN_COMMANDS),
                GroupCommand(name="agent", help="Run an agent (customer side)", subcommands=AGENT_COMMANDS),
                GroupCommand(name="bundles", help="Build and check dag bundle entries", subcommands=BUNDLES_COMMANDS),
                GroupCommand(name="secrets", help="Agent secrets backend (customer side)", subcommands=SECRETS_COMMANDS),
                GroupCommand(name="xcom", help="Object-storage XCom backend (agent)", subcommands=XCOM_COMMANDS),
                CHECK_COMMAND,
                SENTINEL_COMMAND,
            ),
        )
    ]

"""Provider info: how Airflow discovers our executor, plugin, CLI, DB manager and config section."""

from __future__ import annotations


def _opt(description: str, type_: str, default: str | None, example: str | None = None) -> dict:
    return {
        "description": description,
        "version_added": "0.1.0",
        "type": type_,
        "example": example,
        "default": default,
    }


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-remote-execution",
        "name": "Remote Execution",
        "description": "Run Airflow tasks on outbound-only agents inside your own infrastructure.",
        "versions": ["0.1.0"],
        "executors": ["airflow_remote_execution.executors.RemoteExecutor"],
        "plugins": [
            {
                "name": "remote_execution",
                "plugin-class": "airflow_remote_execution.plugins.remote_execution_plugin.RemoteExecutionPlugin",
            }
        ],
        "cli": ["airflow_remote_execution.cli.definition.get_cli_commands"],
        "db-managers": ["airflow_remote_execution.models.db.RemoteExecutionDBManager"],
        "config": {
            "remote_execution": {
                "description": "Remote Execution: the orchestration plane's API and the agents that call it.",
                "options": {
                    # --- orchestration plane ---
                    "api_enabled": _opt(
                        "Mount the Remote Execution API in ``airflow api-server`` (orchestration plane).",
                        "boolean",
                        "True",
                    ),
                    "serve_plane_secrets_to_agents": _opt(
                        "Whether tasks on agents may read the plane's own Connections and Variables through the "
                        "execution API. False (default): no; agents' tasks use the agent's secrets backend and "
                        "AIRFLOW_CONN_*/AIRFLOW_VAR_*, and the plane answers 'not found'. True: all agents. Or a "
                        "comma-separated list of ``queue:NAME`` and ``bundle:NAME`` items whose work may. See "
                        "docs/security.md.",
                        "string",
                        "False",
                        "queue:default,bundle:shared-dags",
                    ),
                    "max_body_size": _opt(
                        "Largest request body, in bytes, the Remote Execution API reads from an agent (after "
                        "authenticating it on its headers); larger ones are answered 413 without being read.",
                        "integer",
                        "1048576",
                    ),
                    "max_parsing_result_size": _opt(
                        "Largest body, in bytes, of ``POST /v1/parsing/results`` (one parsed DAG file: its "
                        "serialized DAGs, and its source with ``send_dag_source``).",
                        "integer",
                        "33554432",
                    ),
                    "auth_failure_limit": _opt(
                        "Failed agent authentications from one client address within a minute after which the "
                        "API answers 429 (Retry-After) to unknown tokens from that address until the minute has "
                        "passed; tokens that authenticated recently are still served. Per api-server process.",
                        "integer",
                        "30",
                    ),
                    "max_long_polls_per_token": _opt(
                        "Lease long-polls one agent token may hold open at once on one api-server process; more "
                        "are answered at once with no work and a Retry-After, not queued. An agent holds one.",
                        "integer",
                        "4",
                    ),
                    "parsed_dag_import_allowlist": _opt(
                        "Comma-separated fnmatch patterns of import paths of *installed* code (the standard "
                        "library, Airflow, providers, site-packages) that DAGs parsed by agents may name as "
                        "deadline-alert callbacks, trigger classes of tasks that start from a trigger, and asset "
                        "watchers' triggers. Empty: none; a SyncCallback must then be the bundle's own code, and "
                        "AsyncCallbacks and triggers from agents' DAGs are refused (they may run in the plane's "
                        "triggerer). Read on the plane for uploaded DAGs and on each agent for the callbacks it "
                        "is asked to run. See docs/security.md.",
                        "string",
                        "",
                        "airflow.providers.slack.notifications.*,airflow.providers.standard.triggers.*",
                    ),
                    "heartbeat_interval": _opt(
                        "Shortest interval in seconds between an agent's heartbeats. The plane returns the "
                        "interval in every heartbeat response, so agents follow the plane's value: this, or "
                        "longer for a large fleet (see max_heartbeat_rate).",
                        "integer",
                        "5",
                    ),
                    "max_heartbeat_rate": _opt(
                        "Heartbeats per second the plane asks of the whole fleet at most: with more than "
                        "heartbeat_interval x this many live agents, the plane lengthens the interval it "
                        "dictates to agents / this (e.g. 2,000 agents at 200/s: every 10 s), and lost-agent "
                        "detection (lost_agent_threshold intervals) follows. 0 keeps heartbeat_interval.",
                        "float",
                        "200",
                    ),
                    "lost_agent_threshold": _opt(
                        "Missed heartbeat intervals after which an agent counts as lost.",
                        "integer",
                        "3",
                    ),
                    "long_poll_wait": _opt(
                        "Longest time in seconds a lease request waits for work before it returns empty.",
                        "float",
                        "20",
                    ),
                    "lease_confirm_timeout": _opt(
                        "Seconds an agent has to confirm the start of leased work; unconfirmed work "
                        "goes back to the queue after this (agents confirm within milliseconds; this bounds "
                        "how long a dead agent's unstarted work waits).",
                        "integer",
                        "10",
                    ),
                    "wakeup_poll_interval": _opt(
                        "On databases without LISTEN/NOTIFY (SQLite), how often in seconds the API "
                        "server looks for newly queued work to wake waiting agents.",
                        "float",
                        "0.02",
                    ),
                    "finished_retention": _opt(
                        "Seconds finished work items are kept (for ``work list`` and audits) before "
                        "the executor purges them.",
                        "integer",
                        "86400",
                    ),
                    # --- XCom object storage (read on the agent, per call) ---
                    "xcom_path": _opt(
                        "Base URL where ``ObjectStorageXComBackend`` puts XCom values larger than "
                        "``xcom_threshold`` (s3://, gs://, abfs://, file:// or a local path). Empty keeps "
                        "every value in the metadata DB. Set it on the agents.",
                        "string",
                        "",
                        "s3://my-bucket/airflow/xcom",
                    ),
                    "xcom_conn_id": _opt(
                        "Airflow connection with the credentials for ``xcom_path`` (aws, google_cloud_platform, "
                        "wasb/adls ...). Empty uses the filesystem's default credentials.",
                        "string",
                        "",
                        "aws_default",
                    ),
                    "xcom_threshold": _opt(
                        "XCom values whose JSON is larger than this many bytes go to ``xcom_path``; smaller "
                        "ones stay in the DB. 0 puts every value in the store.",
                        "integer",
                        "65536",
                    ),
                    "xcom_compression": _opt(
                        "Compression of XCom objects: none, gzip or zstd (zstd needs the ``zstd`` extra).",
                        "string",
                        "none",
                        "zstd",
                    ),
                    # --- agent ---
                    "api_url": _opt(
                        "Base URL of the orchestration plane's api-server, as the agent reaches it.",
                        "string",
                        "http://127.0.0.1:8080",
                        "https://airflow.example.com",
                    ),
                    "execution_api_url": _opt(
                        "Execution API URL for the Task SDK on the agent. Empty means "
                        "``<api_url>/execution/``.",
                        "string",
                        "",
                    ),
                    "token": _opt(
                        "The agent token. Prefer ``token_file`` or the "
                        "``AIRFLOW__REMOTE_EXECUTION__TOKEN`` environment variable.",
                        "string",
                        "",
                    ),
                    "token_file": _opt(
                        "Path of a file holding the agent token (read at start).",
                        "string",
                        "",
                        "/var/run/secrets/airflow-agent/token",
                    ),
                    "queues": _opt(
                        "Comma-separated queues this agent serves; must be within the token's queues. "
                        "Empty means all the token's queues.",
                        "string",
                        "",
                        "default,gpu",
                    ),
                    "concurrency": _opt("Tasks this agent runs at once.", "integer", "4"),
                    "ca_bundle": _opt(
                        "CA bundle file used to verify the plane's TLS certificate. Empty uses the "
                        "system store (or ``REQUESTS_CA_BUNDLE``).",
                        "string",
                        "",
                    ),
                    "client_cert": _opt(
                        "Client certificate file for mutual TLS (PEM).", "string", ""
                    ),
                    "client_key": _opt(
                        "Private key of ``client_cert`` if not in the same file.", "string", ""
                    ),
                    "request_timeout": _opt(
                        "Seconds an ordinary API request may take (long-polls add their wait).",
                        "float",
                        "30",
                    ),
                    "shutdown_timeout": _opt(
                        "On SIGTERM the agent stops leasing and waits this many seconds for running "
                        "tasks before it terminates them.",
                        "integer",
                        "300",
                    ),
                    "components": _opt(
                        "What ``airflow remote-execution agent start`` runs (comma-separated): ``worker`` "
                        "(tasks), ``dag-processor`` (parses this agent's DAG bundles for the plane), ``triggerer`` "
                        "(runs triggers of deferred tasks, see docs/triggers.md). More than "
                        "one runs each in its own process. ``--components`` overrides it.",
                        "string",
                        "worker",
                        "worker,dag-processor",
                    ),
                    "send_dag_source": _opt(
                        "Whether the agent's dag processor sends DAG files' source code to the plane (shown "
                        "in the UI's Code tab). Off: the plane stores only serialized DAGs and a note.",
                        "boolean",
                        "False",
                    ),
                    "log_upload_interval": _opt(
                        "Seconds between partial uploads of running tasks' logs, so the UI shows them while "
                        "tasks run: to the remote log folder with ``[logging] remote_logging`` on, else to the "
                        "plane's log store (``plane_task_logs``). 0 turns partial uploads off (the log then "
                        "appears when the task ends).",
                        "float",
                        "10",
                    ),
                    "plane_task_logs": _opt(
                        "Without ``[logging] remote_logging``: agents send their tasks' logs to the plane "
                        "through the Remote Execution API (while tasks run, every ``log_upload_interval`` s, "
                        "and when they end) and the plane keeps them in its database, where the UI reads "
                        "them. Log text then leaves the agent's infrastructure. ``False`` on an agent: it sends "
                        "none (the UI shows no log of its tasks); ``False`` on the plane: it refuses them.",
                        "boolean",
                        "True",
                    ),
                    "task_log_max_size": _opt(
                        "Plane: the most bytes of one task try's log it keeps from agents "
                        "(``plane_task_logs``); the rest is dropped and the log says so.",
                        "integer",
                        "10485760",
                    ),
                    "task_log_retention": _opt(
                        "Plane: seconds it keeps task logs agents sent (``plane_task_logs``); older ones are "
                        "deleted.",
                        "integer",
                        "2592000",
                    ),
                    "agent_metrics_port": _opt(
                        "Agent: port of its own Prometheus endpoint (``/metrics``: the worker's counters, "
                        "gauges and timers, and the sentinel's checks on the sentinel's probe port). 0: off. "
                        "Your Prometheus scrapes it; the plane never connects to an agent.",
                        "integer",
                        "0",
                        "9108",
                    ),
                    "agent_metrics_host": _opt(
                        "Agent: address its Prometheus endpoint listens on (``agent_metrics_port``).",
                        "string",
                        "0.0.0.0",
                    ),
                    # --- sentinel (beside the agent) ---
                    "status_file": _opt(
                        "Where the agent writes its status for the sentinel (JSON, rewritten every "
                        "heartbeat). Empty means ``$AIRFLOW_HOME/remote-execution-agent.json``. Agent and "
                        "sentinel must see the same file (e.g. a shared emptyDir in Kubernetes).",
                        "string",
                        "",
                        "/var/run/airflow-agent/status.json",
                    ),
                    "sentinel_host": _opt("Address the sentinel's probe server listens on.", "string", "127.0.0.1"),
                    "sentinel_port": _opt("Port of the sentinel's /healthz and /readyz.", "integer", "8990"),
                    "sentinel_report_interval": _opt(
                        "Seconds between the sentinel's status reports to the plane.", "float", "15"
                    ),
                },
            }
        },
    }

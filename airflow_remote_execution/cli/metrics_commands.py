"""``airflow remote-execution metrics-tokens create|list|revoke`` (plane): read-only tokens for the fleet
metrics and autoscaling routes (KEDA, Prometheus). They read figures and can do nothing an agent can."""

from __future__ import annotations

import json
import sys

from airflow.cli.simple_table import AirflowConsole
from airflow.utils.providers_configuration_loader import providers_configuration_loaded
from airflow.utils.session import create_session

from airflow_remote_execution.plane import metrics_tokens


@providers_configuration_loaded
def metrics_tokens_create(args) -> None:
    try:
        with create_session() as session:
            clear, row = metrics_tokens.create(
                session, name=args.name, expires_in=args.expires_in, description=args.description
            )
            info = metrics_tokens.info(row)
    except ValueError as e:
        raise SystemExit(f"Error: {e}") from None
    if args.output == "json":
        print(json.dumps({"token": clear, **info}))
        return
    print(clear)
    print(
        f"Metrics token {info['id']} ({info['name']}), expires {info['expires_at'] or 'never'}: it reads "
        "/remote_execution/metrics/scaling and /prometheus only. It is shown only now.",
        file=sys.stderr,
    )


@providers_configuration_loaded
def metrics_tokens_list(args) -> None:
    with create_session() as session:
        rows = [metrics_tokens.info(r) for r in metrics_tokens.list_tokens(session)]
    AirflowConsole().print_as(data=rows, output=args.output or "table")


@providers_configuration_loaded
def metrics_tokens_revoke(args) -> None:
    try:
        with create_session() as session:
            row = metrics_tokens.revoke(session, args.token_id)
            print(f"Metrics token {row.id} ({row.name}) revoked")
    except LookupError as e:
        raise SystemExit(f"Error: {e.args[0]}") from None

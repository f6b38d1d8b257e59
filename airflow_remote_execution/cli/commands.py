"""Plane-side CLI commands: they use the metadata DB directly, like ``airflow users`` does."""

from __future__ import annotations

import getpass
import sys

from airflow.cli.simple_table import AirflowConsole
from airflow.utils.providers_configuration_loader import providers_configuration_loaded
from airflow.utils.session import create_session

from airflow_remote_execution.plane import agents, tokens

from airflow_remote_execution import config


def _print(rows: list[dict], output: str | None) -> None:
    AirflowConsole().print_as(data=rows, output=output or "table")


def _fail(e: Exception) -> SystemExit:
    return SystemExit(f"Error: {e.args[0] if e.args else e}")


@providers_configuration_loaded
def tokens_create(args) -> None:
    try:
        with create_session() as session:
            clear, row = tokens.create(
                session,
                agent_name=args.name,
                queues=config.split_list(args.queues),
                expires_in=args.expires_in,
                description=args.description,
                bundles=config.split_list(args.bundles),
            )
            info = tokens.to_info(row)
    except ValueError as e:
        raise _fail(e) from None
    _print_new_token(clear, info, args.output)


@providers_configuration_loaded
def tokens_rotate(args) -> None:
    try:
        with create_session() as session:
            clear, row = tokens.rotate(
                session, args.token_id, expires_in=args.expires_in, old_valid_for=args.old_valid_for
            )
            info = tokens.to_info(row)
    except (ValueError, LookupError) as e:
        raise _fail(e) from None
    _print_new_token(clear, info, args.output)


def _print_new_token(clear: str, info, output: str | None) -> None:
    if output == "json":
        import json

        print(json.dumps({"token": clear, **info.model_dump(mode="json")}))
        return
    print(clear)
    print(
        f"Token {info.id} for agent {info.agent_name!r}, queues {','.join(info.queues)}, "
        f"bundles {','.join(info.bundles) or 'none'}, "
        f"expires {info.expires_at.isoformat() if info.expires_at else 'never'}. "
        "It is shown only now: store it in the agent's secret store.",
        file=sys.stderr,
    )


@providers_configuration_loaded
def tokens_list(args) -> None:
    with create_session() as session:
        rows = [tokens.to_info(t).model_dump(mode="json") for t in tokens.list_tokens(session, args.agent_name)]
    for row in rows:
        row["queues"] = ",".join(row["queues"])
        row["bundles"] = ",".join(row["bundles"])
    _print(rows, args.output)


@providers_configuration_loaded
def tokens_revoke(args) -> None:
    try:
        with create_session() as session:
            row = tokens.revoke(session, args.token_id)
            print(f"Token {row.id} of agent {row.agent_name!r} revoked at {row.revoked_at.isoformat()}")
    except LookupError as e:
        raise _fail(e) from None


@providers_configuration_loaded
def agents_list(args) -> None:
    with create_session() as session:
        rows = [a.model_dump(mode="json") for a in agents.list_agents(session)]
    for row in rows:
        row["queues"] = ",".join(row["queues"])
        row.pop("versions", None)
        if args.output in (None, "table", "plain"):  # one short column each; json/yaml keep the details
            status, stale = row.pop("sentinel_status"), row.pop("sentinel_stale")
            age, failing = row.pop("sentinel_age"), row.pop("sentinel_failing")
            row["sentinel"] = f"{status} (stale)" if status and stale else status or "none"
            row["sentinel_age"] = f"{age:.0f}s" if age is not None else ""
            row["sentinel_failing"] = ",".join(f.split(":", 1)[0] for f in failing)
            row.pop("sentinel_at")
            row.pop("drained_by"), row.pop("drained_at")
    _print(rows, args.output)


@providers_configuration_loaded
def agents_drain(args) -> None:
    _set_drained(args.name, True, args.reason)
    print(f"Agent {args.name!r} drained: it finishes its running work and leases nothing new until resumed")


@providers_configuration_loaded
def agents_resume(args) -> None:
    _set_drained(args.name, False)
    print(f"Agent {args.name!r} resumed")


def _set_drained(name: str, drained: bool, reason: str | None = None) -> None:
    try:
        with create_session() as session:
            agents.set_drained(session, name, drained, reason=reason, by=f"{getpass.getuser()} (cli)")
    except LookupError as e:
        raise _fail(e) from None


@providers_configuration_loaded
def agents_remove(args) -> None:
    try:
        with create_session() as session:
            agents.remove(session, args.name, force=args.force)
    except (LookupError, agents.AgentForbidden) as e:
        raise _fail(e) from None
    print(f"Agent {args.name!r} removed")


@providers_configuration_loaded
def work_list(args) -> None:
    from sqlalchemy import select

    from airflow_remote_execution.models import WorkItemModel
    from airflow_remote_execution.wire.api import WorkItemInfo

    with create_session() as session:
        query = select(WorkItemModel).order_by(WorkItemModel.id.desc()).limit(args.limit)
        if args.state:
            query = query.where(WorkItemModel.state == args.state)
        rows = [
            WorkItemInfo.model_validate(r, from_attributes=True).model_dump(mode="json")
            for r in session.scalars(query)
        ]
    for row in rows:
        row["key"] = "/".join(str(k) for k in row["key"][1:])
    _print(rows, args.output)

"""``airflow remote-execution ...`` commands, registered through provider info (``cli``)."""

from __future__ import annotations

from airflow.cli.cli_config import ARG_OUTPUT, ActionCommand, Arg, GroupCommand, lazy_load_command

_CMD = "airflow_remote_execution.cli.commands."

ARG_NAME = Arg(("--name",), help="Agent name the token belongs to (the agent's identity)", required=True)
ARG_QUEUES = Arg(("--queues",), help="Comma-separated queues the agent may serve", required=True)
ARG_EXPIRES_IN = Arg(("--expires-in",), help="Lifetime such as 30d, 12h or 90m (default: no expiry)")
ARG_DESCRIPTION = Arg(("--description",), help="Free text shown in `tokens list`")
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

TOKEN_COMMANDS = (
    ActionCommand(
        name="create",
        help="Create an agent token and print it once",
        func=lazy_load_command(_CMD + "tokens_create"),
        args=(ARG_NAME, ARG_QUEUES, ARG_EXPIRES_IN, ARG_DESCRIPTION, ARG_OUTPUT),
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
        args=(ARG_AGENT_NAME,),
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
        name="start",
        help="Start the agent worker: long-poll the plane for work and run it with the Task SDK",
        func=lazy_load_command("airflow_remote_execution.cli.agent_command.agent_start"),
        args=(ARG_AGENT_QUEUES, ARG_CONCURRENCY),
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
                GroupCommand(name="agent", help="Run an agent (customer side)", subcommands=AGENT_COMMANDS),
            ),
        )
    ]

"""
Issue 13, finding 7 (CLI half): `tokens create --name` accepted agent names the admin API refuses
(``"../../evil name'--"``). One rule now, in plane/tokens.py, for the CLI, the admin API and the UI.
"""

from __future__ import annotations

import argparse
import json

import pytest
from pydantic import ValidationError

from airflow.utils.session import create_session

from airflow_remote_execution.cli import commands
from airflow_remote_execution.models import AgentTokenModel
from airflow_remote_execution.plane import tokens
from airflow_remote_execution.wire.api import TokenCreateRequest

pytestmark = pytest.mark.usefixtures("airflow_db")

BAD = ["../../evil name'--", "", "a b", "a/b", "a\\b", "x'--", "name\n", "a;b", "a" * 251, "ä" + "\u0000"]
GOOD = ["cluster-eu-1", "team_a.gpu@eu", "A1", "a" * 250, "straße-1"]


def create_args(name: str, **extra) -> argparse.Namespace:
    return argparse.Namespace(name=name, queues="default", expires_in=None, description=None, bundles=None,
                              output="json", **extra)


def stored_names() -> list[str]:
    with create_session() as s:
        return [row.agent_name for row in s.query(AgentTokenModel)]


@pytest.mark.parametrize("name", BAD)
def test_cli_refuses_what_the_admin_api_refuses(name, capsys):
    with pytest.raises(ValidationError):
        TokenCreateRequest(agent_name=name, queues=["default"])
    with pytest.raises(SystemExit) as e:
        commands.tokens_create(create_args(name))
    message = str(e.value.code)
    assert message.startswith("Error: Invalid agent name") and repr(name) in message
    assert "letters, digits, '_', '.', '-' or '@'" in message and "e.g. cluster-eu-1" in message
    assert stored_names() == [] and capsys.readouterr().out == ""  # no token made, none printed


@pytest.mark.parametrize("name", GOOD)
def test_valid_names_work_through_the_cli_and_the_api_schema(name, capsys):
    TokenCreateRequest(agent_name=name, queues=["default"])
    commands.tokens_create(create_args(name))
    printed = json.loads(capsys.readouterr().out)
    assert printed["agent_name"] == name and printed["token"].startswith("rex_")
    assert stored_names() == [name]


def test_rotate_of_a_token_with_an_old_invalid_name_says_so():
    """A token created before the rule (by the CLI) cannot be rotated into a new one with that name."""
    with create_session() as s:
        _, row = tokens.create(s, agent_name="legacy", queues=["default"])
        row.agent_name = "legacy name'--"  # as the CLI let it be written before
        token_id = row.id
    with pytest.raises(SystemExit, match="Invalid agent name \"legacy name'--\""):
        commands.tokens_rotate(argparse.Namespace(token_id=token_id, expires_in=None, old_valid_for=None, output=None))

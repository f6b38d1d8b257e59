"""Agent tokens on a real database: creation, hash-only storage, verification and its error messages."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import text

from airflow.sdk import timezone

from airflow_remote_execution.plane import tokens
from airflow_remote_execution.models import AgentTokenModel
from airflow_remote_execution.plane.tokens import TokenError


def _split(clear: str) -> tuple[str, str]:
    prefix, token_id, secret = clear.split("_", 2)
    assert prefix == "rex"
    return token_id, secret


# ------------------------------------------------------------------ parse_duration


@pytest.mark.parametrize(
    ("text_", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("90m", timedelta(minutes=90)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        (" 7 D ", timedelta(days=7)),
    ],
)
def test_parse_duration(text_, expected):
    assert tokens.parse_duration(text_) == expected


@pytest.mark.parametrize("bad", ["", "0d", "d", "30", "1.5h", "-1d", "3y", "10 days", "1h30m"])
def test_parse_duration_rejects_bad_input_with_a_hint(bad):
    with pytest.raises(ValueError, match="Invalid duration .*positive number and a unit s, m, h, d or w"):
        tokens.parse_duration(bad)


def test_huge_expiry_is_a_value_error(sqlite_db):
    with sqlite_db.session() as s, pytest.raises(ValueError):
        tokens.create(s, agent_name="a", queues=["q"], expires_in="99999999d")


# ------------------------------------------------------------------ create / storage


def test_create_returns_clear_token_and_stores_only_its_hash(db):
    with db.session() as s:
        clear, row = tokens.create(s, agent_name="agent-1", queues=[" gpu", "default", "gpu", " "], description="d")
    token_id, secret = _split(clear)
    assert len(token_id) == 16 and len(secret) == 43
    assert row.id == token_id
    assert row.queues == ["default", "gpu"]  # stripped, de-duplicated, sorted, blanks dropped
    assert row.expires_at is None and row.revoked_at is None and row.last_used_at is None

    with db.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM remote_agent_token")).mappings().one()
    assert stored["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    dump = " ".join(str(v) for v in stored.values())
    assert secret not in dump and clear not in dump
    assert stored["id"] == token_id and stored["agent_name"] == "agent-1" and stored["description"] == "d"


def test_each_token_is_unique(db):
    with db.session() as s:
        a, _ = tokens.create(s, agent_name="x", queues=["q"])
        b, _ = tokens.create(s, agent_name="x", queues=["q"])
    assert a != b and _split(a)[0] != _split(b)[0] and _split(a)[1] != _split(b)[1]


def test_create_needs_a_queue(db):
    with db.session() as s, pytest.raises(ValueError, match="at least one queue"):
        tokens.create(s, agent_name="x", queues=[" ", ""])


def test_create_with_expiry(db):
    before = timezone.utcnow()
    with db.session() as s:
        _, row = tokens.create(s, agent_name="x", queues=["q"], expires_in="2h")
    assert before + timedelta(hours=2) <= row.expires_at <= timezone.utcnow() + timedelta(hours=2)
    with db.session() as s, pytest.raises(ValueError, match="Invalid duration"):
        tokens.create(s, agent_name="y", queues=["q"], expires_in="soon")


# ------------------------------------------------------------------ verify


def test_verify_accepts_the_clear_token_and_records_use(db):
    with db.session() as s:
        clear, _ = tokens.create(s, agent_name="agent-1", queues=["default"])
    with db.session() as s:
        row = tokens.verify(s, clear)
        assert row.agent_name == "agent-1"
        first_use = row.last_used_at
    assert first_use is not None
    # Use is recorded coarsely: a second request within a minute does not write again.
    with db.session() as s:
        assert tokens.verify(s, clear).last_used_at == first_use
    with db.session() as s:
        s.get(AgentTokenModel, _split(clear)[0]).last_used_at = timezone.utcnow() - timedelta(minutes=5)
    with db.session() as s:
        assert tokens.verify(s, clear).last_used_at > first_use


@pytest.mark.parametrize("missing", [None, ""])
def test_verify_missing(db, missing):
    with db.session() as s, pytest.raises(TokenError, match="Missing agent token: send 'Authorization: Bearer"):
        tokens.verify(s, missing)


@pytest.mark.parametrize(
    "bad",
    ["not-a-token", "rex_abc_def", "rex_0123456789abcdef_short", "xyz_0123456789abcdef_" + "a" * 43, "rex_0123456789ABCDEF_" + "a" * 43],
)
def test_verify_malformed(db, bad):
    with db.session() as s, pytest.raises(TokenError, match="Malformed agent token") as exc:
        tokens.verify(s, bad)
    assert bad not in str(exc.value)


def test_verify_wrong_secret_and_unknown_id(db):
    with db.session() as s:
        clear, _ = tokens.create(s, agent_name="x", queues=["q"])
    token_id, secret = _split(clear)
    wrong_secret = f"rex_{token_id}_{'A' * 43 if secret != 'A' * 43 else 'B' * 43}"
    unknown_id = f"rex_{'0' * 16 if token_id != '0' * 16 else '1' * 16}_{secret}"
    for bad in (wrong_secret, unknown_id):
        with db.session() as s, pytest.raises(TokenError, match="Invalid agent token: no such token") as exc:
            tokens.verify(s, bad)
        assert secret not in str(exc.value) and "A" * 43 not in str(exc.value)


def test_verify_expired(db):
    with db.session() as s:
        clear, _ = tokens.create(s, agent_name="x", queues=["q"], expires_in="1s")
    token_id, secret = _split(clear)
    with db.session() as s:
        tokens.verify(s, clear)  # still valid
        # Let the second pass without sleeping: move the expiry into the past.
        s.get(AgentTokenModel, token_id).expires_at = timezone.utcnow() - timedelta(milliseconds=1)
    with db.session() as s, pytest.raises(TokenError, match=rf"Agent token {token_id} expired at 20\d\d-") as exc:
        tokens.verify(s, clear)
    assert secret not in str(exc.value)
    with db.session() as s:
        assert tokens.to_info(s.get(AgentTokenModel, token_id)).status == "expired"


def test_revoke(db):
    with db.session() as s:
        clear, _ = tokens.create(s, agent_name="x", queues=["q"], expires_in="30d")
        other, _ = tokens.create(s, agent_name="x", queues=["q"])
    token_id, secret = _split(clear)
    with db.session() as s:
        row = tokens.revoke(s, token_id)
        revoked_at = row.revoked_at
    assert revoked_at is not None
    with db.session() as s, pytest.raises(TokenError, match=rf"Agent token {token_id} was revoked at 20\d\d-") as exc:
        tokens.verify(s, clear)
    assert secret not in str(exc.value)
    # Revoking again keeps the first time; the other token of the same agent still works.
    with db.session() as s:
        assert tokens.revoke(s, token_id).revoked_at == revoked_at
        assert tokens.verify(s, other).agent_name == "x"
        assert tokens.to_info(s.get(AgentTokenModel, token_id)).status == "revoked"
    with db.session() as s, pytest.raises(LookupError, match="No agent token with id 'nope'"):
        tokens.revoke(s, "nope")


def test_list_and_info(db):
    with db.session() as s:
        tokens.create(s, agent_name="b", queues=["q"])
        tokens.create(s, agent_name="a", queues=["q1", "q2"], description="first of a")
    with db.session() as s:
        assert [t.agent_name for t in tokens.list_tokens(s)] == ["b", "a"]  # by creation time
        (only_a,) = tokens.list_tokens(s, "a")
        info = tokens.to_info(only_a)
    assert info.status == "active" and info.queues == ["q1", "q2"] and info.description == "first of a"
    assert "secret" not in info.model_dump()


def test_rotate_keeps_the_old_token_valid_for_the_overlap(db):
    with db.session() as s:
        old_clear, old = tokens.create(s, agent_name="edge-1", queues=["a", "b"])
    with db.session() as s:
        new_clear, new = tokens.rotate(s, old.id, expires_in="30d", old_valid_for="1h")
        assert (new.agent_name, new.queues, new.description) == ("edge-1", ["a", "b"], f"rotated from {old.id}")
    with db.session() as s:
        # Both work during the overlap, for the same agent identity.
        assert tokens.verify(s, old_clear).agent_name == tokens.verify(s, new_clear).agent_name == "edge-1"
        old_row = s.get(AgentTokenModel, old.id)
        assert timedelta(minutes=59) < old_row.expires_at - timezone.utcnow() <= timedelta(hours=1)
        tokens.revoke(s, old.id)
    with db.session() as s:
        with pytest.raises(tokens.TokenError, match="revoked"):
            tokens.verify(s, old_clear)
        assert tokens.verify(s, new_clear).id == new.id
        with pytest.raises(ValueError, match="is revoked: create a new one"):
            tokens.rotate(s, old.id)
        with pytest.raises(LookupError, match="No agent token with id 'nope'"):
            tokens.rotate(s, "nope")


def test_a_second_live_token_of_an_agent_must_have_its_scope(db):
    """Issue 13, finding 7: a second token for the same agent name with other queues acted as that agent
    and could start and finish the first token's work."""
    with db.session() as s:
        _, first = tokens.create(s, agent_name="cluster-a", queues=["default"], bundles=["team-a"])
    with db.session() as s, pytest.raises(ValueError, match=f"already has token {first.id} with queues default"):
        tokens.create(s, agent_name="cluster-a", queues=["gpu"])
    with db.session() as s, pytest.raises(ValueError, match="tokens rotate"):
        tokens.create(s, agent_name="cluster-a", queues=["default"])  # other bundles (none)
    with db.session() as s:
        tokens.create(s, agent_name="cluster-a", queues=["default"], bundles=["team-a"])  # same scope: fine
        tokens.rotate(s, first.id)
        tokens.revoke(s, first.id)
    with db.session() as s:
        for row in tokens.list_tokens(s, "cluster-a"):
            tokens.revoke(s, row.id)
    with db.session() as s:
        tokens.create(s, agent_name="cluster-a", queues=["gpu"])  # all revoked: a new scope is allowed

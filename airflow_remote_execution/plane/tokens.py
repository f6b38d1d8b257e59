"""Agent tokens: ``rex_<id>_<secret>``. Only SHA-256(secret) is stored; the id is public and indexed.

The secret is 256 random bits, so a fast hash is safe (as for GitHub or Stripe keys) and keeps
per-request verification cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from airflow.sdk import timezone

from airflow_remote_execution.models import AgentTokenModel
from airflow_remote_execution.wire.api import AGENT_NAME_MAX_LENGTH, AGENT_NAME_PATTERN, TokenInfo

PREFIX = "rex"
_TOKEN_RE = re.compile(rf"^{PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_\-]{{43}})$")
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
# An agent name: what the admin API's TokenCreateRequest.agent_name allows (AGENT_NAME_PATTERN), checked
# here too so every way in (CLI, admin API, UI) applies the same rule.
_AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class TokenError(Exception):
    """Authentication failed; ``str(e)`` says why without echoing the token."""


def parse_duration(text: str) -> timedelta:
    match = _DURATION_RE.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"Invalid duration {text!r}: use a positive number and a unit s, m, h, d or w (e.g. 30d)")
    try:
        delta = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        timezone.utcnow() + delta
    except OverflowError:
        raise ValueError(f"Invalid duration {text!r}: too long; use at most a few thousand days") from None
    return delta


def check_agent_name(name: object) -> str:
    """``name`` if it is a valid agent name, else a ValueError saying what is allowed."""
    if not isinstance(name, str) or not name or len(name) > AGENT_NAME_MAX_LENGTH or not _AGENT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"Invalid agent name {name!r}: use 1-{AGENT_NAME_MAX_LENGTH} letters, digits, '_', '.', '-' or '@' "
            "(no spaces, '/', quotes or other punctuation), e.g. cluster-eu-1"
        )
    return name


def secret_hash(secret: str) -> str:
    """What is stored of a token's secret (agent and metrics tokens alike)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_status(row: AgentTokenModel, now: datetime | None = None) -> str:
    now = now or timezone.utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def to_info(row: AgentTokenModel) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        agent_name=row.agent_name,
        queues=list(row.queues),
        bundles=list(row.bundles or []),
        description=row.description,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        status=token_status(row),
    )


def create(
    session: Session,
    *,
    agent_name: str,
    queues: list[str],
    expires_in: str | None = None,
    description: str | None = None,
    bundles: list[str] | None = None,
) -> tuple[str, AgentTokenModel]:
    """Create a token; returns the clear token (shown once) and its row. ``bundles``: the DAG bundles
    the agent's dag processor may write (none by default)."""
    check_agent_name(agent_name)
    queues = sorted({q.strip() for q in queues if q.strip()})
    bundles = sorted({b.strip() for b in bundles or [] if b.strip()}) or None
    if not queues:
        raise ValueError("A token needs at least one queue (e.g. --queues default)")
    now = timezone.utcnow()
    # A token names one agent with one scope: another live token of the same agent with another scope
    # could start and finish the first one's work (both act as that agent). Rotation keeps the scope.
    for other in list_tokens(session, agent_name):
        if token_status(other, now) == "active" and (sorted(other.queues), other.bundles or None) != (queues, bundles):
            raise ValueError(
                f"Agent {agent_name!r} already has token {other.id} with queues {','.join(other.queues)} and bundles "
                f"{','.join(other.bundles or []) or 'none'}: a new token for it must have the same scope "
                f"(`tokens rotate {other.id}`), or revoke that token first, or name another agent"
            )
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = AgentTokenModel(
        id=token_id,
        agent_name=agent_name,
        queues=queues,
        bundles=bundles,
        secret_hash=secret_hash(secret),
        description=description,
        created_at=now,
        expires_at=now + parse_duration(expires_in) if expires_in else None,
    )
    session.add(row)
    session.flush()
    return f"{PREFIX}_{token_id}_{secret}", row


def verify(session: Session, token: str | None) -> AgentTokenModel:
    """Return the token's row or raise :class:`TokenError` saying what is wrong."""
    if not token:
        raise TokenError("Missing agent token: send 'Authorization: Bearer <agent token>'")
    match = _TOKEN_RE.match(token)
    if not match:
        raise TokenError("Malformed agent token: expected the 'rex_...' value printed by `tokens create`")
    token_id, secret = match.groups()
    row = session.get(AgentTokenModel, token_id)
    if row is None or not hmac.compare_digest(row.secret_hash, secret_hash(secret)):
        raise TokenError("Invalid agent token: no such token (wrong value or deleted)")
    now = timezone.utcnow()
    status = token_status(row, now)
    if status == "revoked":
        raise TokenError(f"Agent token {row.id} was revoked at {row.revoked_at.isoformat()}")
    if status == "expired":
        raise TokenError(f"Agent token {row.id} expired at {row.expires_at.isoformat()}")
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now  # coarse, so heartbeats do not turn every request into a write
    return row


def list_tokens(session: Session, agent_name: str | None = None) -> list[AgentTokenModel]:
    query = select(AgentTokenModel).order_by(AgentTokenModel.created_at)
    if agent_name:
        query = query.where(AgentTokenModel.agent_name == agent_name)
    return list(session.scalars(query))


def rotate(
    session: Session, token_id: str, *, expires_in: str | None = None, old_valid_for: str | None = None
) -> tuple[str, AgentTokenModel]:
    """A new token for the same agent and queues. The old one stays valid (the overlap window) until
    revoked, its own expiry, or ``old_valid_for`` from now, so agents can be rolled without downtime."""
    old = session.get(AgentTokenModel, token_id)
    if old is None:
        raise LookupError(f"No agent token with id {token_id!r} (see `tokens list`)")
    if token_status(old) != "active":
        raise ValueError(f"Token {token_id} is {token_status(old)}: create a new one with `tokens create` instead")
    clear, new = create(
        session, agent_name=old.agent_name, queues=list(old.queues), expires_in=expires_in,
        description=f"rotated from {old.id}", bundles=list(old.bundles or []),
    )
    if old_valid_for:
        ends = timezone.utcnow() + parse_duration(old_valid_for)
        if old.expires_at is None or ends < old.expires_at:
            old.expires_at = ends
    return clear, new


def revoke(session: Session, token_id: str) -> AgentTokenModel:
    row = session.get(AgentTokenModel, token_id)
    if row is None:
        raise LookupError(f"No agent token with id {token_id!r} (see `tokens list`)")
    if row.revoked_at is None:
        row.revoked_at = timezone.utcnow()
    return row


_parsed_by_agents: tuple[float, frozenset[str]] = (float("-inf"), frozenset())


def bundles_parsed_by_agents(session: Session) -> frozenset[str]:
    """Bundles some live agent token may parse (re-read at most once a second). Work of such a bundle came
    from agents' DAGs, so only agents whose token allows the bundle may run it (``leases.lease``)."""
    global _parsed_by_agents
    now = time.monotonic()
    if now - _parsed_by_agents[0] >= 1.0:
        rows = session.execute(
            select(AgentTokenModel.bundles, AgentTokenModel.expires_at).where(
                AgentTokenModel.revoked_at.is_(None), AgentTokenModel.bundles.is_not(None)
            )
        ).all()
        utcnow = timezone.utcnow()
        names = frozenset(b for bundles, expires in rows if expires is None or expires > utcnow for b in bundles or ())
        _parsed_by_agents = (now, names)
    return _parsed_by_agents[1]

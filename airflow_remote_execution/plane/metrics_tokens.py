"""
Read-only metrics tokens: ``rexm_<id>_<secret>``, for KEDA and Prometheus to read the fleet figures.

A kind of its own, in its own table: an agent token (``rex_...``, table ``remote_agent_token``) is
never looked up here, so it cannot read the figures, and a metrics token is never looked up by the
agents' routes (their pattern is ``rex_<id>_``), so it can do nothing an agent can. As for agent
tokens, only SHA-256 of the 256-bit secret is stored.
"""

from __future__ import annotations

import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from airflow.sdk import timezone

from airflow_remote_execution.models.tables import MetricsTokenModel
from airflow_remote_execution.plane.tokens import TokenError, parse_duration, secret_hash, token_status

PREFIX = "rexm"
_TOKEN_RE = re.compile(rf"^{PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_\-]{{43}})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,250}$")


def create(
    session: Session, *, name: str, expires_in: str | None = None, description: str | None = None
) -> tuple[str, MetricsTokenModel]:
    """A new metrics token; returns the clear token (shown once) and its row."""
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"Invalid name {name!r}: use 1-250 letters, digits, '_', '.', '-' or '@' (e.g. keda)")
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    now = timezone.utcnow()
    row = MetricsTokenModel(
        id=token_id,
        name=name,
        secret_hash=secret_hash(secret),
        description=description,
        created_at=now,
        expires_at=now + parse_duration(expires_in) if expires_in else None,
    )
    session.add(row)
    session.flush()
    return f"{PREFIX}_{token_id}_{secret}", row


def verify(session: Session, authorization: str | None) -> MetricsTokenModel:
    """The row of the metrics token in an ``Authorization: Bearer`` header, or :class:`TokenError`."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if not authorization:
        raise TokenError("Missing metrics token: send 'Authorization: Bearer <metrics token>'")
    if scheme.lower() != "bearer" or not token:
        raise TokenError("Malformed Authorization header: expected 'Bearer <metrics token>'")
    match = _TOKEN_RE.match(token)
    if not match:
        if token.startswith("rex_"):
            raise TokenError("An agent token is not a metrics token: create one with `metrics-tokens create`")
        raise TokenError("Malformed metrics token: expected the 'rexm_...' value printed by `metrics-tokens create`")
    token_id, secret = match.groups()
    row = session.get(MetricsTokenModel, token_id)
    if row is None or not hmac.compare_digest(row.secret_hash, secret_hash(secret)):
        raise TokenError("Invalid metrics token: no such token (wrong value or deleted)")
    state = token_status(row)
    if state == "revoked":
        raise TokenError(f"Metrics token {row.id} was revoked at {row.revoked_at.isoformat()}")
    if state == "expired":
        raise TokenError(f"Metrics token {row.id} expired at {row.expires_at.isoformat()}")
    now = timezone.utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now
    return row


def list_tokens(session: Session) -> list[MetricsTokenModel]:
    return list(session.scalars(select(MetricsTokenModel).order_by(MetricsTokenModel.created_at)))


def revoke(session: Session, token_id: str) -> MetricsTokenModel:
    row = session.get(MetricsTokenModel, token_id)
    if row is None:
        raise LookupError(f"No metrics token with id {token_id!r} (see `metrics-tokens list`)")
    if row.revoked_at is None:
        row.revoked_at = timezone.utcnow()
    return row


def info(row: MetricsTokenModel) -> dict:
    return {
        "id": row.id, "name": row.name, "description": row.description, "status": token_status(row),
        "created_at": row.created_at.isoformat(), "expires_at": row.expires_at and row.expires_at.isoformat(),
        "revoked_at": row.revoked_at and row.revoked_at.isoformat(),
        "last_used_at": row.last_used_at and row.last_used_at.isoformat(),
    }

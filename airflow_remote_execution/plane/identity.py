"""
Who an agent token is, without a database read on every request.

An idle agent's requests (heartbeats, long-polls) are the plane's steady load; verifying each token in
the database made that load grow with the fleet. Each api-server process keeps the identities of the
tokens it verified, and once a second (:data:`CHECK_EVERY`) re-reads the revocation and expiry of all
of them in one query per thousand. So a revoked, expired or deleted token stops working in every
process within that second; anything else about a token (its agent, queues, bundles) never changes.

``tokens.verify`` stays the one place a token is checked; this only remembers its answer.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from airflow.sdk import timezone

from airflow_remote_execution.models import AgentTokenModel
from airflow_remote_execution.plane import tokens

log = logging.getLogger(__name__)
CHECK_EVERY = 0.5  # seconds between re-reads of cached tokens' revocation and expiry
VALID_FOR = 1.0  # a remembered identity is used while the last re-read is at most this old
FORGET_AFTER = 600.0  # a token unused this long leaves the cache
_CHUNK = 1000


@dataclass(frozen=True)
class Identity:
    """A verified agent token, as requests need it."""

    token_id: str
    agent_name: str
    queues: tuple[str, ...]
    bundles: tuple[str, ...]
    expires_at: datetime | None
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, row: AgentTokenModel) -> Identity:
        return cls(row.id, row.agent_name, tuple(row.queues), tuple(row.bundles or ()), row.expires_at, row.revoked_at)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (None if absent); TokenError if malformed."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise tokens.TokenError("Malformed Authorization header: expected 'Bearer <agent token>'")
    return value.strip()


class IdentityCache:
    """Per-process cache of verified tokens; see the module docstring."""

    def __init__(self) -> None:
        self._known: dict[bytes, tuple[Identity, float]] = {}  # sha256(header) -> identity, last used
        self._checked_at = float("-inf")  # when the last re-read started
        self._lock = threading.Lock()
        self._checker: threading.Thread | None = None

    @staticmethod
    def key(authorization: str | None) -> bytes:
        return hashlib.sha256((authorization or "").encode()).digest()

    def cached(self, authorization: str | None) -> Identity | None:
        """The identity if known and re-read within VALID_FOR; no I/O (safe on the event loop)."""
        now = time.monotonic()
        if now - self._checked_at > VALID_FOR:
            return None
        return self._hit(self.key(authorization), now)

    def resolve(self, authorization: str | None) -> Identity:
        """The identity of a live token, or TokenError saying what is wrong. Blocking (database)."""
        self._ensure_checker()
        now = time.monotonic()
        if now - self._checked_at > VALID_FOR:  # the checker is behind: re-read here, once
            self._check()
        key = self.key(authorization)
        if (identity := self._hit(key, now)) is not None:
            return identity
        from airflow.utils.session import create_session

        with create_session() as session:
            identity = Identity.of(tokens.verify(session, bearer(authorization)))
        with self._lock:
            self._known[key] = (identity, now)
        return identity

    def _hit(self, key: bytes, now: float) -> Identity | None:
        entry = self._known.get(key)
        if entry is None:
            return None
        identity, _ = entry
        if identity.expires_at is not None and identity.expires_at <= timezone.utcnow():
            return None  # resolve() verifies again, which says it expired
        self._known[key] = (identity, now)
        return identity

    def forget(self, token_id: str) -> None:
        """Drop a token at once in this process (revoked here); others drop it within VALID_FOR."""
        with self._lock:
            for key in [k for k, (i, _) in self._known.items() if i.token_id == token_id]:
                del self._known[key]

    def _ensure_checker(self) -> None:
        if self._checker is None or not self._checker.is_alive():
            with self._lock:
                if self._checker is None or not self._checker.is_alive():
                    self._checker = threading.Thread(target=self._run, name="remote-execution-tokens", daemon=True)
                    self._checker.start()

    def _run(self) -> None:
        while True:
            try:
                self._check()
            except Exception:  # noqa: BLE001 - the database: requests verify in it themselves meanwhile
                log.warning("Could not re-read agent tokens' revocation; retrying", exc_info=True)
            time.sleep(CHECK_EVERY)

    def _check(self) -> None:
        with self._lock:  # one thread re-reads; the others wait for its answer
            started = time.monotonic()
            if started - self._checked_at <= CHECK_EVERY / 2:
                return
            self._recheck(started)
            self._checked_at = started

    def _recheck(self, now: float) -> None:
        from airflow_remote_execution.plane.own_connections import own_session

        stale = [k for k, (_, used) in self._known.items() if now - used > FORGET_AFTER]
        for key in stale:
            del self._known[key]
        ids = sorted({identity.token_id for identity, _ in self._known.values()})
        current: dict[str, tuple] = {}
        with own_session() as session:
            for start in range(0, len(ids), _CHUNK):
                rows = session.execute(
                    select(AgentTokenModel.id, AgentTokenModel.revoked_at, AgentTokenModel.expires_at).where(
                        AgentTokenModel.id.in_(ids[start : start + _CHUNK])
                    )
                )
                current.update({row.id: (row.revoked_at, row.expires_at) for row in rows})
        for key, (identity, _) in list(self._known.items()):
            revoked_at, expires_at = current.get(identity.token_id, (True, None))  # deleted: as revoked
            if revoked_at is not None:
                del self._known[key]
            elif expires_at != identity.expires_at:  # shortened by a rotation's overlap window
                self._known[key] = (Identity(**{**identity.__dict__, "expires_at": expires_at}), now)


identities = IdentityCache()


def revoke(session: Session, token_id: str) -> AgentTokenModel:
    """Revoke a token: at once in this process, within :data:`VALID_FOR` in every other."""
    row = tokens.revoke(session, token_id)
    identities.forget(token_id)
    return row

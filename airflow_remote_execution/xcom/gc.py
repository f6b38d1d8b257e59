"""
``airflow remote-execution xcom gc``: delete objects under ``xcom_path`` that no XCom row references.

Objects normally go away with their XCom (the Task SDK purges them before a rerun); orphans come from
deleted DAG runs, tasks killed mid-upload, or a changed ``xcom_compression``. GC needs both storage
credentials and the list of live XComs, so it runs on an agent (or anywhere with the agent's config):
it lists old objects itself and asks the plane which of them are still referenced
(``POST /remote_execution/v1/xcom/live``, agent token). With no agent token configured it reads the
metadata DB directly instead (a plane host that also has storage credentials).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from airflow_remote_execution.xcom.store import Coordinates, Settings, why_outside, confined, parse_relative_key

log = logging.getLogger(__name__)
BATCH = 500  # candidates per question to the plane


@dataclass(frozen=True)
class StoredObject:
    url: str  # as written in XCom references (str(ObjectStoragePath))
    coords: Coordinates
    modified: datetime
    size: int


def _modified(info: dict) -> datetime | None:
    for field in ("LastModified", "last_modified", "updated", "mtime", "timeCreated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return None


def list_objects(settings: Settings) -> list[StoredObject]:
    """Every object of ours under ``xcom_path`` (files that do not parse as our layout are never touched)."""
    base = settings.base()
    if not base.exists():
        return []
    found = []
    for path in base.rglob("*"):
        if not path.is_file():
            continue
        rel = path.path[len(base.path):].lstrip("/")  # relative_to() does not work on object-store paths
        coords = parse_relative_key(rel)
        if coords is None or why_outside(settings.path, f"{settings.path}/{rel}") is not None:
            continue  # not of our layout (e.g. characters the layout never writes): never touched
        info = path.stat()
        raw = info if isinstance(info, dict) else {"mtime": info.st_mtime, "size": info.st_size}
        modified = _modified(raw)
        if modified is None:
            log.warning("No modification time for %s; skipped", path)
            continue
        found.append(StoredObject(f"{settings.path}/{rel}", coords, modified, int(raw.get("size") or 0)))
    return found


LiveFn = Callable[[list[StoredObject]], list[bool]]


def live_from_db(objects: list[StoredObject]) -> list[bool]:
    """Plane side: which objects an XCom row still references (same coordinates and same ``ref``)."""
    from airflow.utils.session import create_session

    from airflow_remote_execution.xcom.references import references

    with create_session() as session:
        return [references(session, o.coords, o.url) for o in objects]


def live_from_plane(objects: list[StoredObject]) -> list[bool]:
    """Agent side: ask the plane with the agent token."""
    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.wire.xcom import LiveRequest, LiveResponse, XComObjectRef

    client = PlaneClient.from_config()
    answer: list[bool] = []
    for i in range(0, len(objects), BATCH):
        batch = objects[i : i + BATCH]
        body = LiveRequest(objects=[XComObjectRef(ref=o.url, **o.coords.__dict__) for o in batch])
        answer += client._post("/xcom/live", body, LiveResponse).live
    return answer


@dataclass
class GcResult:
    scanned: int
    old: int
    deleted: list[str]
    kept_live: int
    errors: list[str]


def collect(settings: Settings, older_than: timedelta, live: LiveFn, dry_run: bool = False,
            now: datetime | None = None) -> GcResult:
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    objects = list_objects(settings)
    old = [o for o in objects if o.modified < cutoff]
    flags = live(old) if old else []
    orphans = [o for o, is_live in zip(old, flags, strict=True) if not is_live]
    result = GcResult(len(objects), len(old), [], len(old) - len(orphans), [])
    for o in orphans:
        if dry_run:
            result.deleted.append(o.url)
            continue
        try:
            _delete(settings, o.url)
            result.deleted.append(o.url)
        except Exception as e:  # noqa: BLE001 - report, keep collecting
            result.errors.append(f"{o.url}: {type(e).__name__}: {e}")
    return result


def _delete(settings: Settings, url: str) -> None:
    from airflow.sdk import ObjectStoragePath

    ObjectStoragePath(confined(settings, url), conn_id=settings.conn_id).unlink(missing_ok=True)


def choose_live_source() -> tuple[str, LiveFn]:
    """Agent token configured -> ask the plane; otherwise read the metadata DB (plane host)."""
    from airflow_remote_execution import config

    if config.get("token").strip() or config.get("token_file").strip():
        return "plane API", live_from_plane
    return "metadata DB", live_from_db


def summarize(paths: Iterable[str], limit: int = 20) -> list[str]:
    paths = list(paths)
    return paths[:limit] + ([f"... and {len(paths) - limit} more"] if len(paths) > limit else [])

"""
:class:`ObjectStorageXComBackend`: large XCom values go to S3, GCS, Azure Blob or a local path through
Airflow's ObjectStoragePath; small ones stay in the metadata DB.

Every call here runs on the agent (the Task SDK calls ``serialize_value``, ``deserialize_value`` and
``purge`` in the task process), where the customer's storage credentials are. The plane only ever sees
the reference dict stored in the DB, which the UI and REST API show as it is: the object's URL, its size,
compression, checksum and writer. The plane never needs storage credentials.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk.bases.xcom import BaseXCom

from airflow_remote_execution.xcom import store
from airflow_remote_execution.xcom.gcs_upload import CompositeUpload
from airflow_remote_execution.xcom.s3_download import S3Stream
from airflow_remote_execution.xcom.store import MARKER, Coordinates, Settings, XComStorageError

log = logging.getLogger(__name__)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and MARKER in value


class ObjectStorageXComBackend(BaseXCom):
    """
    ``[core] xcom_backend = airflow_remote_execution.xcom.ObjectStorageXComBackend``.

    Values whose JSON exceeds ``[remote_execution] xcom_threshold`` bytes are streamed (hashed, optionally
    compressed) to ``xcom_path``; the DB keeps a readable reference. Reads verify the checksum and fail
    loudly, naming the object and its writer, when the object is missing or corrupted.
    """

    @staticmethod
    def serialize_value(
        value: Any,
        *,
        key: str | None = None,
        task_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        map_index: int | None = None,
    ) -> Any:
        serialized = BaseXCom.serialize_value(value)  # serde's JSON-able form; shares big strings, no copy
        settings = Settings.from_config()
        if not settings.path:
            if is_reference(serialized):
                raise ValueError(f"XCom values may not be dicts with the reserved key {MARKER!r}")
            return serialized
        fmt, pieces = store.encode(serialized)
        head = bytearray()
        if not (isinstance(serialized, str) and serialized.isascii() and len(serialized) > settings.threshold):
            # Measure while encoding: only the first ``threshold`` bytes are buffered before we know
            # (an ASCII string's length is its size: it is not).
            for piece in pieces:
                head += piece
                if len(head) > settings.threshold:
                    break
            else:
                if not is_reference(serialized):
                    return serialized  # small: stays inline in the DB
        where = Coordinates(dag_id or "", run_id or "", task_id or "", -1 if map_index is None else map_index, key or "")
        return ObjectStorageXComBackend._store(settings, where, fmt, bytes(head), pieces)

    @staticmethod
    def _store(settings: Settings, where: Coordinates, fmt: str, head: bytes, rest) -> dict:
        rel = store.relative_key(where.dag_id, where.run_id, where.task_id, where.map_index, where.key, fmt,
                                 settings.compression)
        path = settings.base() / rel
        url = f"{settings.path}/{rel}"  # readable: no connection id folded into the URL
        if settings.compression == "zstd":
            store._zstandard()  # fail before opening anything if it is not installed
        if settings.is_local():
            path.parent.mkdir(parents=True, exist_ok=True)  # object stores need no directories (nor new buckets)
        if path.protocol in ("gs", "gcs"):
            fileobj: Any = CompositeUpload(path)  # parts in parallel: see gcs_upload
        else:
            fileobj = path.open("wb", block_size=store.IO_BLOCK)  # s3fs would buffer 50 MiB parts
        try:
            written = store.write_stream(fileobj, head, rest, settings.compression)
        except BaseException:
            _abort(fileobj, path)
            raise
        fileobj.close()
        ref = {
            MARKER: 1,
            "ref": url,
            "size": human_size(written.bytes),
            "bytes": written.bytes,
            "stored_bytes": written.stored_bytes,
            "format": fmt,
            "compression": settings.compression,
            "encoding": "ascii" if written.ascii else "utf-8",
            store.CHECKSUM: written.checksum,
            "written_by": where.writer(),
        }
        log.info("XCom %s stored in %s (%s, %s stored)", where.key, ref["ref"], ref["size"],
                 human_size(written.stored_bytes))
        return ref

    @staticmethod
    def deserialize_value(result) -> Any:
        value = result.value
        if not is_reference(value):
            return BaseXCom.deserialize_value(result)
        return BaseXCom.deserialize_value(_Value(read_object(value)))

    @classmethod
    def purge(cls, xcom, *args) -> None:
        """Delete the object of an XCom being cleared (the Task SDK calls this before a rerun overwrites).
        A reference outside ``xcom_path`` is refused (XComStorageError): nothing is deleted."""
        value = getattr(xcom, "value", None)
        if is_reference(value):
            delete_object(value)


def _abort(fileobj, path) -> None:
    """Leave no partial object behind: abort the multipart upload where possible, else delete."""
    try:
        fileobj.discard()  # s3fs/adlfs buffered files, GCS composite uploads: drop the upload
    except Exception:  # noqa: BLE001 - autocommitting files (local) cannot discard
        try:
            fileobj.close()
        finally:
            path.unlink(missing_ok=True)


class _Value:
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _path_of(ref: dict):
    """The object of ``ref``, only if it lies under ``xcom_path`` (store.confined: else XComStorageError).
    Every read and delete goes through here: a reference is data from the XCom table, not trusted."""
    from airflow.sdk import ObjectStoragePath

    settings = Settings.from_config()
    url = store.confined(settings, ref.get("ref"), ref.get("written_by"))
    return ObjectStoragePath(url, conn_id=settings.conn_id)


def read_object(ref: dict) -> Any:
    """The value behind ``ref``, its checksum verified; a clear error if missing, short or corrupted."""
    path = _path_of(ref)
    writer = ref.get("written_by", "an unknown task")
    # Uncompressed objects are read without a read-ahead cache, in blocks (larger ones from object
    # stores); from S3 as one streamed GET, elsewhere one ranged GET per block. Decompressors read small
    # pieces, so they keep the cache.
    plain = ref.get("compression", "none") == "none"
    block = store.IO_BLOCK if store.is_local_url(ref["ref"]) or not plain else store.RANGE_BLOCK
    try:
        if plain and path.protocol in ("s3", "s3a", "s3n"):
            fileobj: Any = S3Stream(path)  # one GET, not one per block: see s3_download
        else:
            fileobj = path.open("rb", block_size=store.IO_BLOCK, **({"cache_type": "none"} if plain else {}))
    except FileNotFoundError:
        raise XComStorageError(
            f"XCom object {ref['ref']} written by {writer} is missing from the store: it was deleted "
            "(lifecycle rule, manual delete, `xcom gc`?) or never uploaded. Clear and rerun that task."
        ) from None
    with fileobj:
        try:
            got = store.read_text(fileobj, int(ref["bytes"]), ref.get("compression", "none"),
                                  ascii=ref.get("encoding") == "ascii", block=block)
        except XComStorageError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken compressed stream is a corrupted object
            raise XComStorageError(
                f"XCom object {ref['ref']} written by {writer} is corrupted: {type(e).__name__}: {e}"
            ) from None
    expected = ref.get(store.CHECKSUM)
    if got.bytes != int(ref["bytes"]) or got.checksum != expected:
        raise XComStorageError(
            f"XCom object {ref['ref']} written by {writer} is corrupted: expected {ref['bytes']} bytes with "
            f"{store.CHECKSUM} {expected}, found {got.bytes if got.bytes <= int(ref['bytes']) else 'more'} bytes"
            f"{'' if got.bytes != int(ref['bytes']) else f' with {store.CHECKSUM} {got.checksum}'}. "
            "Clear and rerun that task."
        )
    text = got.text
    del got
    return store.decode(ref.get("format", "json"), text)


def delete_object(ref: dict) -> None:
    path = _path_of(ref)
    try:
        path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    log.info("Deleted XCom object %s", ref["ref"])

"""
Google Cloud Storage uploads as parallel composite uploads: the stream goes up as part objects, two at a
time, and compose requests join them into the XCom object; the parts are then deleted.

Why: gcsfs writes a stream as one resumable upload whose chunks go one after the other, each waiting for
the previous one's answer, so one connection idles between chunks (and fake-gcs-server hashes the whole
object again on each chunk: a 256 MiB value took 1.7x a one-request upload). Parts in parallel keep the
link and both ends busy; memory stays bounded (two parts in flight, one filling).

The parts are named ``<object>.part<NNNNN>-<upload id>`` beside the object. One left behind (a killed task,
a bucket whose retention policy forbids deleting it) is an orphan that ``xcom gc`` removes. A bucket with
soft delete keeps deleted parts (billed) for its retention period, as it keeps cleared XCom objects.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from concurrent.futures import Future
from urllib.parse import quote

from airflow_remote_execution.xcom.store import XComStorageError

log = logging.getLogger(__name__)

PART_SIZE = 16 << 20  # first part size; doubles every 256 parts to stay under GCS's 1,024 components
IN_FLIGHT = 2  # parts uploading at once
MAX_SOURCES = 32  # GCS compose: sources per request


class CompositeUpload:
    """A write-only file object (``write``, ``close``, ``discard``) for a ``gs://`` ObjectStoragePath.

    A stream that fits in one part is uploaded with one plain request, no part objects at all.
    """

    def __init__(self, path):
        self._fs = path.fs  # an async gcsfs filesystem: parts upload as coroutines on its own loop
        self._target = path.path  # "bucket/key"
        self._id = uuid.uuid4().hex[:12]
        self._buf = bytearray()
        self._parts: list[str] = []
        self._pending: deque[Future] = deque()
        self._done = False
        self._rounds = 0  # compose requests made

    def _part_size(self) -> int:
        return PART_SIZE << (len(self._parts) // 256)

    def write(self, data) -> int:
        """Take ``data`` (never changed by the caller afterwards: a part may be ``data`` itself)."""
        if not self._buf and len(data) >= self._part_size():
            self._send(data)
        else:
            self._buf += data
            if len(self._buf) >= self._part_size():
                self._send(self._buf)
                self._buf = bytearray()
        return len(data)

    def _send(self, data) -> None:
        if len(self._pending) >= IN_FLIGHT:
            self._pending.popleft().result()  # a failed part fails the upload here
        name = f"{self._target}.part{len(self._parts):05d}-{self._id}"
        self._parts.append(name)
        self._pending.append(asyncio.run_coroutine_threadsafe(self._upload(name, data), self._fs.loop))

    def _upload(self, name: str, data):
        """One ``uploadType=media`` request whose body is ``data`` itself. gcsfs's own one-request upload
        (``pipe_file``) is multipart/related: it copies each part into a new body first, and with two
        parts in flight that held 1.36x a 256 MiB value instead of 1.15x."""
        bucket, key = name.split("/", 1)
        return self._fs._call("POST", f"{self._fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                              uploadType="media", name=key, data=data, json_out=True)

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if not self._parts:
            asyncio.run_coroutine_threadsafe(self._upload(self._target, self._buf), self._fs.loop).result()
            return
        try:
            if self._buf:
                self._send(self._buf)
                self._buf = bytearray()
            while self._pending:
                self._pending.popleft().result()
            self._compose()
        except BaseException:
            self._remove_parts(also=[self._target] if self._rounds else [])  # a later round failed
            raise
        self._remove_parts()

    def discard(self) -> None:
        """Drop the upload: no object is written and no part is left (best effort)."""
        self._done = True
        self._remove_parts()

    def _compose(self) -> None:
        """Join the parts in order: 32 sources a request, each later request starting from the object."""
        sources = self._parts[:MAX_SOURCES]
        rest = self._parts[MAX_SOURCES:]
        while True:
            try:
                self._fs.merge(self._target, sources)
            except Exception as e:
                raise XComStorageError(
                    f"Could not compose gs://{self._target} from its parts {sources[0]} .. {sources[-1]}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            self._rounds += 1
            if not rest:
                return
            sources, rest = [self._target, *rest[: MAX_SOURCES - 1]], rest[MAX_SOURCES - 1 :]

    def _remove_parts(self, also: list[str] = ()) -> None:
        """Delete the parts (and ``also``: an object a later compose round failed to finish)."""
        for pending in self._pending:  # let in-flight parts finish: they read the caller's memory
            try:
                pending.result()
            except BaseException:  # noqa: BLE001,S110 - the upload already failed; only cleaning up here
                pass
        self._pending.clear()
        if not self._parts:
            return
        try:
            self._fs.rm([*self._parts, *also])
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - the value is stored; an orphan part is for `xcom gc`
            log.warning("Could not delete %d part objects of gs://%s (%s: %s); `airflow remote-execution "
                        "xcom gc` removes them", len(self._parts), self._target, type(e).__name__, e)
        self._parts = []

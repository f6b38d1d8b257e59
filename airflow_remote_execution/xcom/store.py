"""
Where XCom objects live and how they are written and read: settings (read per call), the deterministic
object layout, and the streaming writer/reader (encode, hash and compress chunk by chunk).

Layout: ``<xcom_path>/<dag_id>/<run_id>/<task_id>/<map_index>/<key>.<format>[.gz|.zst]``. The key is
deterministic so a rerun overwrites its earlier object, and ``xcom gc`` can tell from a path alone
which XCom row (dag, run, task, map index, key) it belongs to.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from airflow_remote_execution import config

CHUNK = 1 << 20  # encode/hash/compress/write in 1 MiB pieces: bounded memory beside the value itself
IO_BLOCK = 16 << 20  # upload part size for object stores (S3 parts must be >= 5 MiB)
READ_BLOCK = 64 << 20  # download range size: few requests (each has a fixed cost), hashing overlaps the next
COMPRESSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
DEFAULT_THRESHOLD = 65536
MARKER = "__remote_execution_xcom__"  # key of the reference dict kept in the DB instead of a large value
_SAFE = re.compile(r"[A-Za-z0-9_.:+=@,-]")


class XComStorageError(RuntimeError):
    """An XCom object is missing, corrupted or unreadable; the message names the object and its writer."""


@dataclass(frozen=True)
class Settings:
    path: str  # base URL such as s3://bucket/xcom; empty: every value stays in the DB
    conn_id: str | None
    threshold: int  # values of more bytes (serialised) go to the object store
    compression: str  # none | gzip | zstd

    @classmethod
    def from_config(cls) -> Settings:
        """Read ``[remote_execution] xcom_*`` now (never cached: a changed config applies to the next call)."""
        compression = (config.get("xcom_compression") or "none").strip().lower()
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"[remote_execution] xcom_compression = {compression!r} is not supported: use none, gzip or zstd"
            )
        raw_threshold = config.get("xcom_threshold").strip()
        try:
            threshold = int(raw_threshold) if raw_threshold else DEFAULT_THRESHOLD
        except ValueError:
            raise ValueError(f"[remote_execution] xcom_threshold = {raw_threshold!r} is not a number of bytes") from None
        if threshold < 0:
            raise ValueError("[remote_execution] xcom_threshold must be >= 0 (0 puts every value in the store)")
        return cls(
            path=config.get("xcom_path").strip().rstrip("/"),
            conn_id=config.get("xcom_conn_id").strip() or None,
            threshold=threshold,
            compression=compression,
        )

    def is_local(self) -> bool:
        return "://" not in self.path or self.path.startswith(("file://", "local://"))

    def base(self):
        from airflow.sdk import ObjectStoragePath

        if not self.path:
            raise ValueError("[remote_execution] xcom_path is not set (e.g. s3://my-bucket/xcom)")
        return ObjectStoragePath(self.path, conn_id=self.conn_id)


# ------------------------------------------------------------------------------------------------ layout


def _escape(segment: str) -> str:
    """Keep readable characters; ``~XX`` for the rest (``/``, ``?``, ``#``, ``%``, spaces, non-ASCII...)."""
    if segment in ("", ".", ".."):
        return "".join(f"~{b:02X}" for b in segment.encode()) if segment else "~"
    return "".join(c if _SAFE.fullmatch(c) else "".join(f"~{b:02X}" for b in c.encode()) for c in segment)


def _unescape(segment: str) -> str:
    if segment == "~":
        return ""
    data = bytearray()
    i = 0
    while i < len(segment):
        if segment[i] == "~":
            data += bytes.fromhex(segment[i + 1 : i + 3])
            i += 3
        else:
            data += segment[i].encode()
            i += 1
    return data.decode()


def relative_key(dag_id: str, run_id: str, task_id: str, map_index: int, key: str, fmt: str, compression: str) -> str:
    return "/".join(
        [_escape(dag_id), _escape(run_id), _escape(task_id), str(map_index), _escape(key) + f".{fmt}"]
    ) + COMPRESSIONS[compression]


@dataclass(frozen=True)
class Coordinates:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key: str

    def writer(self) -> str:
        mapped = f"[{self.map_index}]" if self.map_index >= 0 else ""
        return f"{self.dag_id}.{self.task_id}{mapped} in run {self.run_id} (key {self.key!r})"


_NAME = re.compile(r"^(?P<key>.+)\.(json|text)(\.gz|\.zst)?$")


def parse_relative_key(rel: str) -> Coordinates | None:
    """The XCom a relative object key belongs to, or None if it is not one of ours."""
    parts = rel.strip("/").split("/")
    if len(parts) != 5:
        return None
    match = _NAME.match(parts[4])
    try:
        if not match:
            return None
        return Coordinates(
            _unescape(parts[0]), _unescape(parts[1]), _unescape(parts[2]), int(parts[3]), _unescape(match["key"])
        )
    except ValueError:
        return None


# -------------------------------------------------------------------------------------------- encoding


def _str_chunks(s: str, quoted: bool) -> Iterator[bytes]:
    """A string in ``CHUNK``-sized UTF-8 pieces (JSON-escaped if ``quoted``); never a second full copy."""
    enc = json.encoder.encode_basestring  # type: ignore[attr-defined]
    if quoted:
        yield b'"'
    for i in range(0, len(s), CHUNK):
        piece = s[i : i + CHUNK]
        if quoted:
            piece = enc(piece)[1:-1]
        yield piece.encode("utf-8", "surrogatepass")
    if quoted:
        yield b'"'


def iter_json(value: Any) -> Iterator[bytes]:
    """Stream the JSON of a serde-serialised value (dict/list/str/number/bool/None) in pieces."""
    if isinstance(value, str):
        yield from _str_chunks(value, quoted=True)
    elif isinstance(value, dict):
        yield b"{"
        for i, (k, v) in enumerate(value.items()):
            yield (b"," if i else b"") + json.dumps(str(k)).encode() + b":"
            yield from iter_json(v)
        yield b"}"
    elif isinstance(value, (list, tuple)):
        yield b"["
        for i, v in enumerate(value):
            if i:
                yield b","
            yield from iter_json(v)
        yield b"]"
    else:
        yield json.dumps(value).encode()


def encode(value: Any) -> tuple[str, Iterator[bytes]]:
    """The format (``text`` for a top-level string: no escaping, read back without a parser) and its bytes."""
    if isinstance(value, str):
        return "text", _str_chunks(value, quoted=False)
    return "json", iter_json(value)


def decode(fmt: str, data: bytearray) -> Any:
    """Decode, then free the raw bytes before parsing: at most ~2x the value in memory, not 3x."""
    text = data.decode("utf-8", "surrogatepass")
    try:
        data.clear()
    except BufferError:  # still exported somewhere: it goes when the caller drops it
        pass
    return text if fmt == "text" else json.loads(text)


# ------------------------------------------------------------------------------------------ stream io


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise XComStorageError(
            "[remote_execution] xcom_compression = zstd needs the 'zstandard' package on this machine: "
            "pip install 'airflow-remote-execution[zstd]' (or use gzip / none)"
        ) from None
    return zstandard


class _Counting:
    """Counts the bytes that reach the store (after compression)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.count = 0

    def write(self, data) -> int:
        self.count += len(data)
        self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class Written:
    bytes: int  # serialised (uncompressed) size
    stored_bytes: int
    sha256: str


class _Sha256:
    """sha256 fed from a second thread once the data is larger than one chunk: hashlib releases the GIL
    on large buffers, so hashing overlaps encoding, compression and upload (sha256 alone is ~600 MB/s
    on a small VM core, slower than a local disk). Chunks are hashed in order; nothing is copied."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def update(self, data) -> None:
        if self._thread is None and len(data) < CHUNK:
            self._digest.update(data)
            return
        if self._thread is None:
            self._queue = queue.Queue(maxsize=4)  # bounds memory: at most 4 chunks waiting
            self._thread = threading.Thread(target=self._run, name="xcom-sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def _run(self) -> None:
        try:
            while (data := self._queue.get()) is not None:
                self._digest.update(data)
        except BaseException as e:  # noqa: BLE001 - surfaced by hexdigest()
            self._error = e

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.close()
        if self._error:
            raise self._error
        return self._digest.hexdigest()


def write_stream(fileobj: IO[bytes], first: bytes, rest: Iterator[bytes], compression: str) -> Written:
    """Write ``first`` then ``rest`` through sha256 (of the uncompressed bytes) and the compressor."""
    counting = _Counting(fileobj)
    if compression == "gzip":
        out: Any = gzip.GzipFile(fileobj=counting, mode="wb", compresslevel=6, mtime=0)
    elif compression == "zstd":
        out = _zstandard().ZstdCompressor(level=3).stream_writer(counting, closefd=False)
    else:
        out = counting
    digest = _Sha256()
    size = 0

    def emit(chunk) -> None:
        nonlocal size
        digest.update(chunk)
        out.write(chunk)
        size += len(chunk)

    try:
        buf = bytearray(first)
        for piece in rest:
            if not buf and len(piece) >= CHUNK:
                emit(piece)  # a large string's slice: no copy
                continue
            buf += piece
            if len(buf) >= CHUNK:
                emit(buf)
                buf = bytearray()
        if buf:
            emit(buf)
        if out is not counting:
            out.close()
    finally:
        digest.close()
    return Written(size, counting.count, digest.hexdigest())


@dataclass
class Read:
    data: bytearray
    sha256: str
    bytes: int  # how many uncompressed bytes the object really had (up to the expected size + 1)


def read_stream(fileobj: IO[bytes], size: int, compression: str) -> Read:
    """Read exactly ``size`` uncompressed bytes into one preallocated buffer, hashing as it goes."""
    if compression == "gzip":
        src: Any = gzip.GzipFile(fileobj=fileobj, mode="rb")
    elif compression == "zstd":
        src = _zstandard().ZstdDecompressor().stream_reader(fileobj, closefd=False)
    else:
        src = fileobj
    data = bytearray(size)
    view = memoryview(data)
    digest = _Sha256()
    pos = 0
    try:
        while pos < size:
            n = src.readinto(view[pos : pos + READ_BLOCK])
            if not n:
                break
            digest.update(view[pos : pos + n])  # hashed in place by the hashing thread, no copy
            pos += n
        extra = src.read(1) if pos == size else b""
    finally:
        digest.close()
    sha = digest.hexdigest()
    view.release()
    return Read(data, sha, pos + len(extra))

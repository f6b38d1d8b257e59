"""
Where XCom objects live and how they are written and read: settings (read per call), the deterministic
object layout, and the streaming writer/reader (encode, hash and compress chunk by chunk).

Layout: ``<xcom_path>/<dag_id>/<run_id>/<task_id>/<map_index>/<key>.<format>[.gz|.zst]``. The key is
deterministic so a rerun overwrites its earlier object, and ``xcom gc`` can tell from a path alone
which XCom row (dag, run, task, map index, key) it belongs to.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from airflow_remote_execution import config
from airflow_remote_execution.xcom import ascii_str

CHUNK = 1 << 20  # encode/checksum/compress/write in 1 MiB pieces: bounded memory beside the value itself
IO_BLOCK = 16 << 20  # upload part size (S3 parts must be >= 5 MiB) and download block: few requests
RANGE_BLOCK = 32 << 20  # download block of an object store read straight into the value (a ranged GET each, but S3)
CHECKSUM = "xxh3_128"  # the reference's key holding the checksum of the serialised bytes
COMPRESSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
DEFAULT_THRESHOLD = 65536
MARKER = "__remote_execution_xcom__"  # key of the reference dict kept in the DB instead of a large value
_SAFE = re.compile(r"[A-Za-z0-9_.:+=@,-]")
log = logging.getLogger(__name__)


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
        return is_local_url(self.path)

    def base(self):
        from airflow.sdk import ObjectStoragePath

        if not self.path:
            raise ValueError("[remote_execution] xcom_path is not set (e.g. s3://my-bucket/xcom)")
        return ObjectStoragePath(self.path, conn_id=self.conn_id)


def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


# ------------------------------------------------------------------------------------------ confinement

# Schemes that name the same store (fsspec aliases); local paths may be written with or without file://.
_SCHEME_FAMILY = {"": "file", "file": "file", "local": "file", "gcs": "gs", "s3a": "s3", "s3n": "s3"}
# What a path below xcom_path may consist of: what the layout writes (_escape's characters and ``~``).
# No ``%`` (no percent-encoded ``..`` or ``/``), no ``?``/``#``, no ``\``, no whitespace, nothing non-ASCII.
_SEGMENT = re.compile(r"[A-Za-z0-9_.:+=@,~-]+")


def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme family, netloc: bucket/container/account/host, path) of an xcom_path or a reference."""
    from urllib.parse import urlsplit

    if "://" not in url:
        return "file", "", url  # a local path without scheme
    parts = urlsplit(url)
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("it has a query or fragment")
    scheme = parts.scheme.lower()
    return _SCHEME_FAMILY.get(scheme, scheme), parts.netloc, parts.path


def confined(settings: Settings, url: Any, writer: str | None = None) -> str:
    """``url`` (an XCom reference's ``ref``, or an object ``xcom gc`` would delete) if it lies under
    ``settings.path``, else :class:`XComStorageError` (logged) naming it and ``xcom_path``.

    Every read and delete of an XCom object calls this first: a reference comes from the XCom table,
    which tasks (and so agents) write, so a planted ``file:///etc/passwd`` or ``s3://other-bucket/x``
    must never be read or deleted. Under ``xcom_path`` means: the same scheme (aliases such as
    ``gs``/``gcs`` and ``file://``/a bare path are the same), the same bucket/container/account/host,
    ``xcom_path``'s path followed by ``/``, then only non-empty segments of the characters the layout
    writes, none of them ``.`` or ``..`` (no ``%``, so no percent-encoded tricks; no query/fragment).
    """
    reason = why_outside(settings.path, url)
    if reason is None:
        return url
    message = (
        f"XCom reference {url!r}{f' (written by {writer})' if writer else ''} is not under "
        f"[remote_execution] xcom_path = {settings.path!r}: {reason}. Refused: it is neither read nor deleted. "
        "This backend only writes references under xcom_path, so this one was planted in the XCom table or "
        "xcom_path changed since it was written; delete that XCom entry (UI, or the REST API's "
        "DELETE .../xcomEntries/{key}) and rerun the task that should write it."
    )
    log.error(message)
    raise XComStorageError(message)


def why_outside(base: str, url: Any) -> str | None:
    """Why ``url`` is not under ``base``; None if it is."""
    if not base:
        return "no xcom_path is configured here"
    if not isinstance(url, str) or not url:
        return "the reference is not a URL string"
    try:
        b_scheme, b_host, b_path = _split_url(base)
        scheme, host, path = _split_url(url)
    except ValueError as e:
        return str(e)
    if scheme != b_scheme:
        return f"another scheme ({scheme}:// instead of {b_scheme}://)"
    if host != b_host:
        return f"another bucket, container, account or host ({host!r} instead of {b_host!r})"
    prefix = b_path.rstrip("/") + "/"
    if not path.startswith(prefix):
        return f"its path is not below {prefix!r}"
    rest = path[len(prefix):]
    for segment in rest.split("/"):
        if segment in ("", ".", ".."):
            return f"its path below xcom_path has an empty, '.' or '..' segment ({rest!r})"
        if not _SEGMENT.fullmatch(segment):
            return (f"its path below xcom_path has characters the object layout never writes ({rest!r}; "
                    "percent-encoding, '\\', whitespace and non-ASCII are refused)")
    return None


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


# an object, or one of the part objects of its GCS upload (gcs_upload): an orphan if it is still there
_NAME = re.compile(r"^(?P<key>.+)\.(json|text)(\.gz|\.zst)?(\.part[0-9]+-[0-9a-f]+)?$")


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


def _ascii_blocks(text: str, raw: memoryview) -> Iterator[memoryview]:
    """``IO_BLOCK`` views of an ASCII string's own bytes (``raw``). The generator holds ``text`` until it
    is dropped: after the file object's close (the backend's ``_store`` holds it), which is after the last
    view was written, or for GCS uploaded (gcs_upload waits for its parts in flight)."""
    for i in range(0, len(raw), IO_BLOCK):
        yield raw[i : i + IO_BLOCK]


def encode(value: Any) -> tuple[str, Iterator[bytes | memoryview]]:
    """The format (``text`` for a top-level string: no escaping, read back without a parser) and its bytes.

    A large ASCII string is not encoded at all: its pieces are views of its own bytes (see ascii_str).
    """
    if isinstance(value, str):
        if len(value) >= CHUNK and (raw := ascii_str.view(value)) is not None:
            return "text", _ascii_blocks(value, raw)
        return "text", _str_chunks(value, quoted=False)
    return "json", iter_json(value)


def decode(fmt: str, text: str) -> Any:
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


class _BackgroundWriter:
    """Calls ``write`` on a second thread, at most ``depth`` chunks behind: compressors and file/socket
    writes release the GIL, so compression and upload overlap encoding on another core. A failed write
    is raised by the next :meth:`write` or by :meth:`close`; later chunks are dropped, never written."""

    def __init__(self, write: Callable[[Any], Any], depth: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xcom-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(data)
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    self._error = e

    def write(self, data) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


def _buffer_reader(src: IO[bytes], block: int, limit: int, depth: int = 2) -> Iterator[memoryview]:
    """Blocks of ``src`` (up to ``limit`` bytes in all), read by a second thread into ``depth`` reused
    buffers while the caller works on the previous one. Each view is valid until the next is asked for."""
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(depth):
        free.put(bytearray(block))

    def run() -> None:
        total = 0
        try:
            while (buf := free.get()) is not None:
                view = memoryview(buf)
                want = min(block, limit - total)
                n = 0
                while n < want and (got := src.readinto(view[n:want])):
                    n += got
                view.release()
                total += n
                full.put((buf, n))
                if n < want or total >= limit:
                    break
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            full.put((e, 0))
        full.put((None, 0))

    thread = threading.Thread(target=run, name="xcom-reader", daemon=True)
    thread.start()
    try:
        while True:
            buf, n = full.get()
            if buf is None:
                return
            if isinstance(buf, BaseException):
                raise buf
            view = memoryview(buf)[:n]
            try:
                yield view
            finally:
                view.release()
            free.put(buf)
    finally:
        free.put(None)


def _utf8_length(lead: int) -> int:
    """The length of the UTF-8 character starting with byte ``lead`` (1 for bytes that cannot start one:
    decoding them raises)."""
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1


def _complete_utf8(view: memoryview) -> int:
    """How many leading bytes of ``view`` are whole UTF-8 characters (a block may end inside one)."""
    n = len(view)
    i = n - 1
    while i >= max(0, n - 4) and view[i] & 0xC0 == 0x80:  # continuation bytes
        i -= 1
    return i if i >= 0 and n - i < _utf8_length(view[i]) else n


@dataclass(frozen=True)
class Written:
    bytes: int  # serialised (uncompressed) size
    stored_bytes: int
    checksum: str  # CHECKSUM of the serialised bytes
    ascii: bool  # every byte < 0x80: a reader may fill a new ASCII string with them (see ascii_str)


def _digest():
    import xxhash  # ~25 GB/s; sha256 (~0.8 GB/s here) cost more than the upload itself

    return xxhash.xxh3_128()


def write_stream(fileobj: IO[bytes], first: bytes, rest: Iterator[bytes], compression: str) -> Written:
    """Write ``first`` then ``rest`` through the checksum (of the uncompressed bytes) and the compressor;
    compression and writes run on a second thread."""
    counting = _Counting(fileobj)
    if compression == "gzip":
        out: Any = gzip.GzipFile(fileobj=counting, mode="wb", compresslevel=6, mtime=0)
    elif compression == "zstd":
        out = _zstandard().ZstdCompressor(level=3).stream_writer(counting, closefd=False)
    else:
        out = counting
    digest = _digest()
    size = 0
    ascii_only = True
    writer = _BackgroundWriter(out.write)

    def emit(chunk) -> None:
        nonlocal size, ascii_only
        digest.update(chunk)
        if ascii_only and not isinstance(chunk, memoryview):  # views are of ASCII strings (encode)
            ascii_only = chunk.isascii()
        writer.write(chunk)  # the writer owns ``chunk`` from here: it is never changed again
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
    finally:
        writer.close()
    if out is not counting:
        out.close()
    return Written(size, counting.count, digest.hexdigest(), ascii_only)


@dataclass
class Read:
    text: str
    checksum: str
    bytes: int  # how many uncompressed bytes the object really had (up to the expected size + 1)


def _concat(pieces: Iterable[str]) -> str:
    """``"".join(pieces)`` without holding the pieces and the result at once: CPython grows a string in
    place when ``+=`` holds its only reference. The interpreter takes that path only once this loop is
    warm (specialised), hence the warm-up call at import."""
    text = ""
    for piece in pieces:
        text += piece
    return text


_concat("x" for _ in range(256))


def read_text(fileobj: IO[bytes], size: int, compression: str, ascii: bool = False,
              block: int = IO_BLOCK) -> Read:
    """Read and decode up to ``size + 1`` uncompressed bytes as UTF-8, checksumming as it goes.

    Reads and decompression run on a second thread. A value its writer found ASCII is read straight
    into a new string, ``block`` bytes a read (see :func:`_read_ascii`); any other text grows in place,
    ``IO_BLOCK`` a read. Either way a pull peaks near the value's size plus a few blocks, not twice it.
    """
    if compression == "gzip":
        src: Any = gzip.GzipFile(fileobj=fileobj, mode="rb")
    elif compression == "zstd":
        src = _zstandard().ZstdDecompressor().stream_reader(fileobj, closefd=False)
    else:
        src = fileobj
    if ascii and size >= CHUNK and (made := ascii_str.new(size)) is not None:
        return _read_ascii(src, size, block, *made)
    digest = _digest()
    total = 0

    def pieces() -> Iterator[str]:
        nonlocal total
        carry = b""  # the start of a character split between two blocks
        for view in _buffer_reader(src, max(1, min(IO_BLOCK, size + 1)), size + 1):
            digest.update(view)
            total += len(view)
            start = 0
            if carry:
                start = min(len(view), _utf8_length(carry[0]) - len(carry))
                carry += bytes(view[:start])
                if len(carry) < _utf8_length(carry[0]):
                    continue
                yield carry.decode("utf-8", "surrogatepass")
            end = start + _complete_utf8(view[start:])
            while start < end:  # CHUNK-sized pieces: the piece being appended stays small
                stop = min(start + CHUNK, end)
                if stop < end:
                    stop = start + (_complete_utf8(view[start:stop]) or stop - start)
                yield str(view[start:stop], "utf-8", "surrogatepass")
                start = stop
            carry = bytes(view[end:])
        if carry:
            yield carry.decode("utf-8", "surrogatepass")  # raises: the object ends inside a character

    text = _concat(pieces())
    return Read(text, digest.hexdigest(), total)


def _read_ascii(src: IO[bytes], size: int, block: int, text: str, view: memoryview) -> Read:
    """Read ``size`` bytes straight into ``text`` (new, unfilled; see ascii_str.new) on a second thread,
    as a plain ``read`` fills its new ``bytes``: the faults of the fresh memory are taken there, outside
    the GIL. This thread follows behind it, checksumming every block and checking that it is ASCII.
    ``text`` is returned only when all of it was read and is ASCII; else ``Read.text`` is empty."""
    digest = _digest()
    progress: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run(owner: str) -> None:  # holds the string: its memory outlives every write into it
        filled = 0
        try:
            while filled < size and not stop.is_set():
                got = src.readinto(view[filled : min(size, filled + block)])
                if not got:
                    break
                filled += got
                progress.put(filled)
            progress.put(("end", filled + (len(src.read(1)) if filled == size else 0)))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            progress.put(e)
        del owner

    thread = threading.Thread(target=run, args=(text,), name="xcom-reader", daemon=True)
    thread.start()
    checked = 0
    try:
        while not isinstance(msg := progress.get(), tuple):
            if isinstance(msg, BaseException):
                raise msg
            for start in range(checked, msg, CHUNK):
                piece = view[start : min(msg, start + CHUNK)]
                digest.update(piece)
                try:
                    codecs.ascii_decode(piece)
                except UnicodeDecodeError as e:
                    raise ValueError(f"byte {start + e.start} is not ASCII, yet the object was written as ASCII") from None
            checked = msg
    finally:
        stop.set()
        thread.join()
    total = msg[1]
    return Read(text if total == size else "", digest.hexdigest(), total)

"""
ObjectStorageXComBackend against real stores started here: moto (S3), Azurite (Azure Blob),
fake-gcs-server (GCS) and a local directory. Round trips, inline vs object, compression, checksums,
missing/corrupted objects, purge, rerun overwrite, config per call, gc, the doctor check, memory.
"""

from __future__ import annotations

import gc as pygc
import json
import random
import sys
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest

from emulators import AWS_TEST_CREDENTIALS, azurite, azurite_connection_string, fake_gcs, moto

from airflow_remote_execution.xcom import ObjectStorageXComBackend as XCom
from airflow_remote_execution.xcom import XComStorageError, ascii_str, gcs_upload, store
from airflow_remote_execution.xcom.backend import _Value, is_reference
from airflow_remote_execution.xcom.check import xcom_store
from airflow_remote_execution.xcom.gc import collect, list_objects
from airflow_remote_execution.xcom.store import Coordinates, Settings, parse_relative_key, relative_key

RUN_ID = "manual__2026-11-21T10:00:00.123456+00:00"
KINDS = ("local", "s3", "azure", "gcs")


@pytest.fixture(scope="module")
def servers():
    with moto() as s3, azurite() as az, fake_gcs() as gcs:
        boto3.client("s3", endpoint_url=s3.url, **AWS_TEST_CREDENTIALS).create_bucket(Bucket="xcom")
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(azurite_connection_string(az)).create_container("xcom")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.url}
                       ).create_bucket("xcom")
        yield {"s3": s3, "azure": az, "gcs": gcs}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def xcom_store_env(kind, servers, monkeypatch, tmp_path):
    """Point [remote_execution] xcom_* at one store (env vars: read per call by the backend)."""
    monkeypatch.setenv("AIRFLOW__CORE__XCOM_BACKEND", "airflow_remote_execution.xcom.ObjectStorageXComBackend")
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD", "1024")
    monkeypatch.delenv("AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID", raising=False)
    prefix = f"{tmp_path.name}"  # a fresh prefix per test in the shared buckets
    if kind == "local":
        path = f"file://{tmp_path}/xcom"
    elif kind == "s3":
        monkeypatch.setenv("AIRFLOW_CONN_XCOM_S3", json.dumps(
            {"conn_type": "aws", "extra": {**AWS_TEST_CREDENTIALS, "endpoint_url": servers["s3"].url}}))
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID", "xcom_s3")
        path = f"s3://xcom/{prefix}"
    elif kind == "azure":
        monkeypatch.setenv("AIRFLOW_CONN_XCOM_AZ", json.dumps(
            {"conn_type": "wasb", "extra": {"connection_string": azurite_connection_string(servers["azure"])}}))
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID", "xcom_az")
        path = f"abfs://xcom/{prefix}"
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", servers["gcs"].url)
        path = f"gs://xcom/{prefix}"
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", path)
    return path


def push(value, key="return_value", task_id="produce", map_index=-1):
    return XCom.serialize_value(value, key=key, dag_id="big_dag", run_id=RUN_ID, task_id=task_id, map_index=map_index)


def pull(stored):
    return XCom.deserialize_value(_Value(json.loads(json.dumps(stored))))  # through JSON, as via the DB


def obj(ref: dict):
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(ref["ref"], conn_id=Settings.from_config().conn_id)


def damage_object(ref: dict, damage: str) -> None:
    """Rewrite the object behind ``ref``: a bit flipped, a byte >= 0x80 first or last, 10 bytes cut or
    4 added."""
    data = bytearray(obj(ref).read_bytes())
    if damage == "flip":
        data[100] ^= 1
    elif damage == "non-ascii-first":
        data[0] = 0xC3
    elif damage == "non-ascii-last":
        data[-1] = 0xFF
    elif damage == "truncate":
        del data[-10:]
    else:
        assert damage == "extend"
        data += b"more"
    with obj(ref).open("wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip_inline_and_object(xcom_store_env, compression, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", compression)
    small = {"rows": 3}
    assert push(small) == small  # under the threshold: inline, untouched
    big_text = "héllo wörld \u2603 " * 500
    big_struct = {"t": (1, 2), "rows": [{"id": i, "v": None, "f": 1.5, "ok": True} for i in range(200)]}
    for value in (big_text, big_struct):
        ref = push(value)
        assert is_reference(ref)
        assert ref["ref"].startswith(xcom_store_env + "/big_dag/manual__2026-11-21T10:00:00.123456+00:00/produce/-1/")
        assert ref["compression"] == compression and ref["written_by"].startswith("big_dag.produce in run")
        assert obj(ref).exists()
        assert obj(ref).stat()["size"] == ref["stored_bytes"]
        if compression != "none":
            assert ref["stored_bytes"] < ref["bytes"]
        assert pull(ref) == value


def test_missing_object_names_it_and_its_writer(xcom_store_env):
    ref = push("x" * 5000, task_id="producer", map_index=3)
    obj(ref).unlink()
    with pytest.raises(XComStorageError) as e:
        pull(ref)
    assert ref["ref"] in str(e.value) and "big_dag.producer[3]" in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("kind", ["local", "s3"])  # verification is store-agnostic; two kinds suffice
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupted_object_is_an_error(xcom_store_env, damage):
    ref = push("abcdefgh" * 1000)
    damage_object(ref, damage)
    with pytest.raises(XComStorageError, match="corrupted") as e:
        pull(ref)
    assert ref["ref"] in str(e.value) and "big_dag.produce" in str(e.value)


@pytest.mark.parametrize("kind", ["local"])
def test_corrupted_compressed_object_is_an_error(xcom_store_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", "zstd")
    ref = push([str(i) for i in range(5000)])
    with obj(ref).open("wb") as f:
        f.write(b"not zstd at all")
    with pytest.raises(XComStorageError, match="corrupted"):
        pull(ref)


def test_purge_deletes_and_rerun_overwrites_the_same_object(xcom_store_env):
    first = push("a" * 5000)
    second = push("b" * 6000)  # a rerun of the same task and key: same deterministic object
    assert first["ref"] == second["ref"] and pull(second) == "b" * 6000
    XCom.purge(_Value(second))
    assert not obj(second).exists()
    XCom.purge(_Value(second))  # already gone: fine
    XCom.purge(_Value({"inline": "value"}))  # nothing to delete


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_config_is_read_per_call(xcom_store_env, monkeypatch):
    assert is_reference(push("y" * 2000))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD", "100000")
    assert push("y" * 2000) == "y" * 2000
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD", "0")
    assert is_reference(push(1))


@pytest.mark.parametrize("kind", ["local"])
def test_reserved_marker_in_a_small_value_goes_to_the_store(xcom_store_env):
    tricky = {store.MARKER: 1, "ref": "s3://elsewhere/secret"}
    ref = push(tricky)
    assert is_reference(ref) and ref["ref"] != tricky["ref"]
    assert pull(ref) == tricky


@pytest.mark.parametrize("kind", ["local"])
def test_bad_config_is_a_clear_error(xcom_store_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", "lz4")
    with pytest.raises(ValueError, match="xcom_compression = 'lz4' is not supported: use none, gzip or zstd"):
        push("z" * 5000)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", "none")
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD", "1MB")
    with pytest.raises(ValueError, match="xcom_threshold = '1MB' is not a number of bytes"):
        push("z" * 5000)


@pytest.mark.parametrize("kind", ["local"])
def test_missing_zstandard_is_a_clear_error(xcom_store_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(XComStorageError, match=r"pip install 'airflow-remote-execution\[zstd\]'"):
        push("z" * 5000)


def test_no_xcom_path_keeps_values_inline(monkeypatch):
    monkeypatch.delenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", raising=False)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD", "0")
    assert push("q" * 5000) == "q" * 5000
    assert xcom_store().skipped


@pytest.mark.parametrize(
    "parts",
    [
        ("dag", RUN_ID, "task", -1, "return_value"),
        ("d.g-1", "scheduled__2026-01-01T00:00:00+00:00", "grp.task", 7, "my key/with?odd#chars%~"),
        ("dag", "run", "task", 0, "ключ ☃"),
        ("dag", "..", "task", 0, ""),
    ],
)
def test_object_layout_round_trips(parts):
    for fmt in ("json", "text"):
        for compression in ("none", "gzip", "zstd"):
            rel = relative_key(*parts, fmt, compression)
            assert "?" not in rel and "#" not in rel and "%" not in rel and rel.count("/") == 4
            c = parse_relative_key(rel)
            assert (c.dag_id, c.run_id, c.task_id, c.map_index, c.key) == parts
    assert parse_relative_key("some/other/file.txt") is None
    assert parse_relative_key("a/b/c/notanint/k.json") is None


def test_gc_deletes_only_old_unreferenced_objects_of_our_layout(xcom_store_env):
    live_ref = push("l" * 5000, task_id="live")
    orphan_ref = push("o" * 5000, task_id="orphan")
    settings = Settings.from_config()
    foreign = settings.base() / "README.txt"
    foreign.write_text("not an XCom object")
    part = {"ref": live_ref["ref"] + ".part00003-0123456789ab"}  # left by a killed GCS upload (gcs_upload)
    obj(part).write_text("a part")
    found = {o.url for o in list_objects(settings)}
    assert found == {live_ref["ref"], orphan_ref["ref"], part["ref"]}

    def live(objects):
        return [o.url == live_ref["ref"] for o in objects]

    assert collect(settings, timedelta(days=7), live).old == 0  # all are new: nothing to do
    later = datetime.now(timezone.utc) + timedelta(days=8)
    dry = collect(settings, timedelta(days=7), live, dry_run=True, now=later)
    assert sorted(dry.deleted) == sorted([orphan_ref["ref"], part["ref"]]) and obj(orphan_ref).exists()
    done = collect(settings, timedelta(days=7), live, now=later)
    assert sorted(done.deleted) == sorted([orphan_ref["ref"], part["ref"]]) and done.kept_live == 1
    assert not done.errors and not obj(orphan_ref).exists() and not obj(part).exists()
    assert obj(live_ref).exists() and foreign.exists()


def test_doctor_check(xcom_store_env, monkeypatch):
    result = xcom_store()
    assert result.ok and not result.skipped, result
    assert not list_objects(Settings.from_config())  # the probe cleaned up after itself
    if xcom_store_env.startswith("s3://"):
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", "s3://no-such-bucket/xcom")
        result = xcom_store()
        assert not result.ok and "no-such-bucket" in result.detail and "xcom_conn_id" in result.hint


@pytest.mark.parametrize("kind", ["local"])
def test_large_values_stream_without_extra_copies(xcom_store_env):
    """Python-level allocations while pushing and pulling a 64 MiB value (tracemalloc: deterministic)."""
    size = 64 << 20
    pull(push("w" * 5000, key="warm_up"))  # first use imports and caches things: not what is measured
    value = "v" * size
    pygc.collect()
    tracemalloc.start()
    try:
        ref = push(value)
        _, push_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = pull(ref)
        _, pull_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert back == value
    assert push_peak < 16 << 20, f"push allocated {push_peak / size:.2f}x the value (expected: a few 1 MiB chunks)"
    # The result itself is 1x; the text grows in place, so only the reader's two blocks and the piece
    # being appended come on top (not a second copy of the value).
    assert pull_peak < size + 2 * store.IO_BLOCK + 2 * store.CHUNK, f"pull allocated {pull_peak / size:.2f}x the value"


@pytest.mark.parametrize("kind", ["local"])
@pytest.mark.parametrize(("block", "chunk"), [(1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (7, 1 << 20), (64, 4), (64, 5)])
def test_characters_split_between_read_blocks(xcom_store_env, monkeypatch, block, chunk):
    """Read blocks of 1-7 bytes and decoded pieces of 4-5 bytes cut 2-, 3- and 4-byte UTF-8 characters
    at every position."""
    monkeypatch.setattr(store, "IO_BLOCK", block)
    monkeypatch.setattr(store, "CHUNK", chunk)
    text = "aé€😀" * 50 + "\udcff"  # a lone surrogate too: JSON-free text keeps it (surrogatepass)
    for value in (text, {"k": [text, 1]}):
        assert pull(push(value)) == value


@pytest.fixture
def small_blocks(kind, monkeypatch):
    """Blocks small enough that a 100 kB value takes the large-value paths, in uneven reads (object
    stores keep their upload part size, IO_BLOCK: S3 parts must be >= 5 MiB)."""
    monkeypatch.setattr(store, "CHUNK", 4096)
    monkeypatch.setattr(store, "RANGE_BLOCK", 5 * 4096 + 3)
    if kind == "local":
        monkeypatch.setattr(store, "IO_BLOCK", 3 * 4096 + 1)


@pytest.fixture
def filled_strings(monkeypatch):
    """How many strings were read straight from the store into their memory (ascii_str.new)."""
    made = []
    real = ascii_str.new
    monkeypatch.setattr(ascii_str, "new", lambda size: made.append(size) or real(size))
    return made


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_ascii_text_is_written_from_and_read_into_the_string_itself(xcom_store_env, small_blocks, filled_strings,
                                                                    monkeypatch, compression):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", compression)
    value = "".join(f"{i:07d} " for i in range(12_500))  # 100 kB
    ref = push(value)
    assert ref["encoding"] == "ascii" and ref["bytes"] == len(value) and ref["format"] == "text"
    assert pull(ref) == value and filled_strings == [len(value)]
    for other in ("é" + value, {"rows": [value, 1]}):  # not ASCII; JSON of ASCII strings
        other_ref = push(other)
        assert other_ref["encoding"] == ("utf-8" if isinstance(other, str) else "ascii")
        assert pull(other_ref) == other
    assert filled_strings == [len(value), len(json.dumps({"rows": [value, 1]}, separators=(",", ":")))]


def test_ascii_str_views_only_compact_ascii_strings():
    assert ascii_str.available()
    text = "".join(["abc", "def"])
    assert bytes(ascii_str.view(text)) == b"abcdef" and ascii_str.view(text).readonly
    assert ascii_str.view("é" * 10) is None and ascii_str.view("\u2603") is None

    class Sub(str):
        pass

    assert ascii_str.view(Sub("abc")) is None
    assert ascii_str.new(0) is None  # the shared empty string is never handed out for writing
    made, view = ascii_str.new(3)
    view[:] = b"xyz"
    assert made == "xyz" and hash(made) == hash("xyz") and made.upper() == "XYZ"


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("damage", ["non-ascii-first", "non-ascii-last", "truncate", "extend"])
def test_corrupted_ascii_object_is_an_error_not_a_string(xcom_store_env, small_blocks, filled_strings, damage):
    value = "abcdefgh" * 12_500
    ref = push(value)
    damage_object(ref, damage)
    with pytest.raises(XComStorageError, match="corrupted") as e:
        pull(ref)
    assert ref["ref"] in str(e.value) and filled_strings == [len(value)]


@pytest.mark.parametrize("kind", ["local"])
def test_non_ascii_bytes_never_fill_an_ascii_string(xcom_store_env, small_blocks):
    """A reference that says ASCII (tampered, or a bug) over UTF-8 bytes whose checksum matches: the
    bytes are checked, so no string holding bytes >= 0x80 as ASCII characters is ever returned."""
    value = "x" * 50_000 + "é" + "y" * 50_000
    ref = push(value)
    assert ref["encoding"] == "utf-8"
    with pytest.raises(XComStorageError, match="byte 50000 is not ASCII"):
        pull({**ref, "encoding": "ascii"})


def test_local_path_without_scheme(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", str(tmp_path / "plain"))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD", "10")
    ref = push(list(range(100)))
    assert Path(tmp_path / "plain" / "big_dag").is_dir() and pull(ref) == list(range(100))


@pytest.fixture
def small_parts(monkeypatch):
    """GCS parts of 64 KiB, composed 4 sources a request: a 600 kB value takes every path of a 256 MiB
    one (several compose rounds). Counts the parts sent."""
    monkeypatch.setattr(gcs_upload, "PART_SIZE", 64 << 10)
    monkeypatch.setattr(gcs_upload, "MAX_SOURCES", 4)
    monkeypatch.setattr(store, "CHUNK", 4096)
    sent = []
    real = gcs_upload.CompositeUpload._send
    monkeypatch.setattr(gcs_upload.CompositeUpload, "_send", lambda self, data: sent.append(len(data)) or real(self, data))
    return sent


@pytest.mark.parametrize("kind", ["gcs"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_gcs_values_go_up_in_parallel_parts_composed_in_order(xcom_store_env, small_parts, monkeypatch, compression):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION", compression)
    rng = random.Random(0)
    value = {"rows": [f"{rng.getrandbits(32):08x}{'é' if i % 1000 == 0 else ''}" for i in range(50_000)]}  # ~600 kB
    ref = push(value)
    assert pull(ref) == value
    assert len(small_parts) >= (9 if compression == "none" else 3), small_parts  # zstd: ~260 kB
    assert min(small_parts[:-1]) >= 64 << 10 and sum(small_parts) == ref["stored_bytes"]
    # the parts are gone: only the object is left under the prefix
    assert {o.url for o in list_objects(Settings.from_config())} == {ref["ref"]}


@pytest.mark.parametrize("kind", ["gcs"])
def test_gcs_value_within_one_part_is_one_upload_without_parts(xcom_store_env, small_parts):
    value = "s" * 50_000
    ref = push(value)
    assert small_parts == [] and pull(ref) == value
    assert {o.url for o in list_objects(Settings.from_config())} == {ref["ref"]}


@pytest.mark.parametrize("kind", ["gcs"])
def test_gcs_upload_failing_midway_leaves_no_object_and_no_parts(xcom_store_env, small_parts):
    def stream():
        for _ in range(5):
            yield b"x" * (100 << 10)
        raise RuntimeError("the value's encoder failed")

    settings = Settings.from_config()
    where = Coordinates("big_dag", RUN_ID, "produce", -1, "return_value")
    with pytest.raises(RuntimeError, match="encoder failed"):
        XCom._store(settings, where, "json", b"[", stream())
    assert len(small_parts) >= 3  # parts were up before the failure
    assert list_objects(settings) == []


@pytest.mark.parametrize("kind", ["gcs"])
def test_gcs_upload_to_a_missing_bucket_fails_and_names_it(xcom_store_env, small_parts, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", "gs://no-such-bucket/xcom")
    for value in ("b" * 50_000, "b" * 500_000):  # one request; parts
        with pytest.raises(Exception, match="no-such-bucket|Not Found|404"):
            push(value)


@pytest.mark.parametrize("kind", ["gcs"])
def test_gcs_compose_failing_in_a_later_round_leaves_no_half_object(xcom_store_env, small_parts):
    """Part 5 vanishes before the compose (4 sources a round): round 1 wrote parts 0-3 to the object, round
    2 fails. The push fails and neither that half object nor any part is left."""
    settings = Settings.from_config()

    def stream():
        for _ in range(7):
            yield b"x" * (100 << 10)  # one part each
        for _ in range(100):
            parts = [o for o in list_objects(settings) if ".part00005-" in o.url]
            if parts:
                break
            time.sleep(0.05)
        obj({"ref": parts[0].url}).unlink()
        yield b"]"

    with pytest.raises(XComStorageError, match=r"Could not compose gs://xcom/.*/return_value\.json from its parts"):
        XCom._store(settings, Coordinates("big_dag", RUN_ID, "produce", -1, "return_value"), "json", b"[", stream())
    assert len(small_parts) == 8
    assert list_objects(settings) == []


# ------------------------------------------------------------------ confinement: references stay under xcom_path
# A reference is data from the XCom table, which tasks (agents) write: a planted one must never make a
# task read or delete anything outside xcom_path (issue 13, finding 3).


def planted_victim(base: str, monkeypatch, where: str) -> dict:
    """A valid object (checksum and all) written under ``where`` instead of ``base``; back to ``base``."""
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", where)
    ref = push("secret " * 1000, task_id="victim")
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", base)
    return ref


def assert_refused(planted: dict, base: str, caplog) -> None:
    """Read, purge and delete all refuse ``planted`` naming it and xcom_path, log it, touch nothing."""
    from airflow_remote_execution.xcom.backend import delete_object

    for attempt in (lambda: pull(planted), lambda: XCom.purge(_Value(planted)), lambda: delete_object(planted)):
        caplog.clear()
        with pytest.raises(XComStorageError, match="is not under") as e:
            attempt()
        assert repr(planted.get("ref")) in str(e.value) and f"xcom_path = {base!r}" in str(e.value)
        assert "Refused" in str(e.value) and any("is not under" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", KINDS)
def test_planted_reference_outside_xcom_path_is_neither_read_nor_deleted(xcom_store_env, monkeypatch, caplog):
    """An object in a sibling prefix (``<xcom_path>-other``: no ``/`` boundary), as another DAG's XCom."""
    victim = planted_victim(xcom_store_env, monkeypatch, xcom_store_env + "-other")
    with monkeypatch.context() as m:  # it is a perfectly readable object where it was written
        m.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", xcom_store_env + "-other")
        assert pull(victim) == "secret " * 1000
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", xcom_store_env)
    assert_refused(victim, xcom_store_env, caplog)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", xcom_store_env + "-other")
    assert obj(victim).exists()  # nothing was deleted
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", xcom_store_env)
    assert pull(push("mine " * 1000)) == "mine " * 1000  # legit references still work


def _tricks(base: str, sibling_ref: str) -> dict[str, object]:
    """Reference URLs that name (or try to name) something outside ``base``, each a different trick."""
    scheme, _, rest = base.partition("://")
    host, _, prefix = rest.partition("/")
    name = base.rsplit("/", 1)[1]
    rel = sibling_ref[len(base + "-other/"):]
    other = f"{name}-other/{rel}"
    tricks: dict[str, object] = {
        "sibling prefix without a / boundary": sibling_ref,
        "dot-dot segment": f"{base}/../{other}",
        "dot-dot deeper": f"{base}/big_dag/../../{other}",
        "dot segment": f"{base}/./{rel}",
        "empty segment": f"{base}//{rel}",
        "percent-encoded dot-dot": f"{base}/%2e%2e/{other}",
        "percent-encoded DOT-DOT": f"{base}/%2E%2E/{other}",
        "percent-encoded slash": f"{base}/..%2f{other}",
        "double percent-encoding": f"{base}/%252e%252e/{other}",
        "backslash": f"{base}/..\\{other}",
        "unicode dots": f"{base}/\uff0e\uff0e/{other}",
        "query": f"{base}/{rel}?versionId=1",
        "fragment": f"{base}/{rel}#x",
        "xcom_path itself": base,
        "absolute local file": "file:///etc/passwd",
        "bare absolute path": "/etc/passwd",
        "not a string": 12345,
        "missing": None,
    }
    if scheme == "s3":
        tricks |= {
            "other bucket": f"s3://victim/{prefix}/{rel}",
            "other scheme, same bucket and path": f"gs://{host}/{prefix}/{rel}",
            "userinfo before the bucket": f"s3://{host}@victim/{prefix}/{rel}",
            "other scheme: local file": "file:///etc/passwd",
        }
    else:  # local: file:///.../xcom
        path = rest
        tricks |= {
            "other scheme, same path": f"s3:/{path}/{rel}",
            "host in a file URL": f"file://evil{path}/{rel}",
            "bare path of the sibling": sibling_ref.removeprefix("file://"),
        }
    return tricks


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_every_trick_to_leave_xcom_path_is_refused(xcom_store_env, servers, monkeypatch, caplog, kind):
    """Each trick in turn (one store round trip for all of them: the check reads nothing first)."""
    if kind == "s3":
        s3 = boto3.client("s3", endpoint_url=servers["s3"].url, **AWS_TEST_CREDENTIALS)
        if "victim" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket="victim")
    victim = planted_victim(xcom_store_env, monkeypatch, xcom_store_env + "-other")
    tricks = _tricks(xcom_store_env, victim["ref"])
    if kind == "s3":
        planted_victim(xcom_store_env, monkeypatch, tricks["other bucket"].rsplit("/big_dag/", 1)[0])
    missed = []
    for trick, url in tricks.items():
        planted = {**victim, "ref": url}
        if url is None:
            del planted["ref"]
        try:
            assert_refused(planted, xcom_store_env, caplog)
        except (Exception, pytest.fail.Exception) as e:  # noqa: BLE001 - every trick reported, not the first
            missed.append(f"{trick}: {url!r}: {str(e).splitlines()[0]}")
    assert not missed, "not refused:\n" + "\n".join(missed)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", xcom_store_env + "-other")
    assert pull(victim) == "secret " * 1000  # still there, unchanged


@pytest.mark.parametrize("kind", ["local"])
def test_planted_reference_to_a_local_file_is_not_deleted(xcom_store_env, tmp_path, caplog):
    """The attack as found: ``ref: file:///<any path>`` cleared by the Task SDK deleted that file."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    ref = {store.MARKER: 1, "ref": f"file://{precious}", "bytes": 7, "format": "text", "compression": "none",
           "written_by": "evil.task in run r (key 'return_value')"}
    for planted in (ref, {**ref, "ref": str(precious)}, {**ref, "ref": f"{xcom_store_env}/../precious.txt"}):
        assert_refused(planted, xcom_store_env, caplog)
        assert precious.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["local"])
def test_gc_never_deletes_outside_xcom_path(xcom_store_env, tmp_path, caplog):
    from airflow_remote_execution.xcom import gc as xcom_gc

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    settings = Settings.from_config()
    for url in (f"file://{precious}", f"{settings.path}/../precious.txt", f"{settings.path}/%2e%2e/precious.txt"):
        with pytest.raises(XComStorageError, match="is not under"):
            xcom_gc._delete(settings, url)
    assert precious.read_text() == "keep me"
    # an object with characters the layout never writes is not listed (so never deleted) either
    odd = settings.base() / "big_dag" / "run%2e" / "t" / "-1" / "k.json"
    odd.parent.mkdir(parents=True, exist_ok=True)
    odd.write_text("{}")
    ours = push("g" * 5000, task_id="gc")
    assert {o.url for o in list_objects(settings)} == {ours["ref"]}


@pytest.mark.parametrize("kind", ["local"])
def test_legit_references_in_every_spelling_of_xcom_path(xcom_store_env, monkeypatch, tmp_path):
    ref = push("v" * 5000)
    bare = xcom_store_env.removeprefix("file://")
    for base in (bare, bare + "/", xcom_store_env + "/"):  # xcom_path spelt with or without file://, with a /
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__XCOM_PATH", base)
        assert pull(ref) == "v" * 5000
        assert pull({**ref, "ref": ref["ref"].removeprefix("file://")}) == "v" * 5000
    XCom.purge(_Value(ref))
    assert not obj(ref).exists()


def test_confinement_rule():
    from airflow_remote_execution.xcom.store import why_outside

    ok = [("s3://b/p", "s3://b/p/d/r/t/-1/k.json"), ("S3://b/p", "s3a://b/p/x"), ("gs://b", "gcs://b/x/y"),
          ("abfs://c@acct.dfs.core.windows.net/p", "abfs://c@acct.dfs.core.windows.net/p/a~2E~2E/k.json.zst"),
          ("wasb://c/p", "wasb://c/p/x"), ("/srv/xcom", "file:///srv/xcom/x"), ("rel/xcom", "rel/xcom/a")]
    for base, url in ok:
        assert why_outside(base, url) is None, (base, url)
    bad = [("s3://b/p", "s3://b/p"), ("s3://b/p", "s3://b/px/y"), ("s3://b/p", "s3://B/p/x"),
           ("abfs://c@acct.dfs.core.windows.net/p", "abfs://c@other.dfs.core.windows.net/p/x"),
           ("abfs://c/p", "wasb://c/p/x"), ("gs://b/p", "gs://b/p/a/%2e%2e/x"), ("", "s3://b/p/x"),
           ("rel/xcom", "rel/xcom/../x"), ("/srv/xcom", "/srv/xcom/a b")]
    for base, url in bad:
        assert why_outside(base, url) is not None, (base, url)

#!/usr/bin/env python
"""
Object-storage XCom backend vs raw put/get on the same store, same run; plus peak RSS.

For each store (default: a local directory and S3 on a moto server started here) and each size
(1 KiB, 1 MiB, 256 MiB), the value is an ASCII string of that size. Timed, median of ``reps``:

* backend: ``ObjectStorageXComBackend.serialize_value`` (push: encode, xxh3-128, upload) then
  ``deserialize_value`` (pull: download, verify, decode), threshold 0 so every size goes to the store;
* raw: ``ObjectStoragePath.open("wb").write(bytes)`` then ``.read_bytes()`` of the same bytes
  (already encoded before the clock starts): the floor a backend can reach.

Peak RSS: the 256 MiB push and pull (and, for comparison, a raw put of the string's UTF-8 and a raw
get) each run in a fresh child process, with the process's RSS before the value exists (``baseline``:
Python, Airflow and every provider's filesystem, ~170-190 MiB whatever the value) next to it. The
target is judged on ``peak - baseline``: the memory the value took, its own copy (1x) included.

Prints one JSON document on stdout (progress on stderr)::

    .venv/bin/python bench/xcom.py [--stores local,s3] [--big-mib 256] [--compression none]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

MIB = 1 << 20
TARGETS = {"throughput_ratio_at_256_mib": 0.9, "peak_rss_over_value": 1.5}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    return _status("VmRSS")


def peak_rss_mib() -> float:
    """VmHWM: peak RSS since start or the last :func:`reset_peak` (ru_maxrss survives fork+exec on Linux)."""
    return _status("VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_value(size: int) -> str:
    return os.urandom(size // 2).hex() if size % 2 == 0 else os.urandom(size // 2 + 1).hex()[:size]


def quiet() -> None:
    import logging

    logging.getLogger("airflow_remote_execution.xcom").setLevel(logging.WARNING)


def push(value, key: str = "return_value"):
    from airflow_remote_execution.xcom import ObjectStorageXComBackend

    return ObjectStorageXComBackend.serialize_value(
        value, key=key, dag_id="bench", run_id="bench_run", task_id="produce", map_index=-1
    )


def pull(ref):
    from airflow_remote_execution.xcom import ObjectStorageXComBackend
    from airflow_remote_execution.xcom.backend import _Value

    return ObjectStorageXComBackend.deserialize_value(_Value(ref))


def child(mode: str, size: int, ref_file: str) -> None:
    """One 256 MiB push or pull in a fresh process; prints its RSS figures as JSON."""
    import airflow_remote_execution.xcom.backend  # noqa: F401 - imports out of the baseline
    quiet()
    from airflow.sdk import ObjectStoragePath  # noqa: F401

    # Warm up: the first ObjectStoragePath use loads every provider's filesystem (s3fs, gcsfs, adlfs ...),
    # ~100+ MiB per process whatever the value size; the baseline is taken after it.
    pull(push("warm-up", key="warm_up"))
    baseline = rss_mib()
    started = time.perf_counter()
    if mode in ("push", "raw_put"):
        value = make_value(size)
        with_value = rss_mib()
        reset_peak()  # making the value took temporary copies: measure the push alone
        started = time.perf_counter()
        if mode == "push":
            Path(ref_file).write_text(json.dumps(push(value)))
        else:
            with _raw_path(size).open("wb") as f:
                f.write(value.encode())
    else:
        with_value = baseline
        reset_peak()
        value = pull(json.loads(Path(ref_file).read_text())) if mode == "pull" else _raw_path(size).read_bytes()
        assert len(value) == size
    seconds = time.perf_counter() - started
    print(json.dumps({"mode": mode, "baseline_rss_mib": round(baseline, 1), "rss_with_value_mib": round(with_value, 1),
                      "peak_rss_mib": round(peak_rss_mib(), 1), "seconds": round(seconds, 3)}))


def _raw_path(size: int):
    from airflow.sdk import ObjectStoragePath

    from airflow_remote_execution.xcom.store import Settings

    settings = Settings.from_config()
    path = ObjectStoragePath(f"{settings.path}/raw/object-{size}", conn_id=settings.conn_id)
    if settings.is_local():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def measure(store: str, sizes: list[int], reps: dict[int, int]) -> dict:
    out = {}
    for size in sizes:
        n = reps[size]
        value = make_value(size)
        data = value.encode()
        raw_path = _raw_path(size)
        timings = {"backend_push": [], "backend_pull": [], "raw_put": [], "raw_get": []}
        for _ in range(n):
            t = time.perf_counter()
            ref = push(value)
            timings["backend_push"].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = pull(ref)
            timings["backend_pull"].append(time.perf_counter() - t)
            assert back == value
            del back
            t = time.perf_counter()
            with raw_path.open("wb") as f:
                f.write(data)
            timings["raw_put"].append(time.perf_counter() - t)
            t = time.perf_counter()
            got = raw_path.read_bytes()
            timings["raw_get"].append(time.perf_counter() - t)
            assert len(got) == size
            del got
        med = {k: statistics.median(v) for k, v in timings.items()}
        backend_total = med["backend_push"] + med["backend_pull"]
        raw_total = med["raw_put"] + med["raw_get"]
        label = f"{size // MIB} MiB" if size >= MIB else f"{size // 1024} KiB"
        out[label] = {
            "reps": n,
            "median_ms": {k: round(v * 1000, 2) for k, v in med.items()},
            "backend_mib_s": round(2 * size / MIB / backend_total, 1),
            "raw_mib_s": round(2 * size / MIB / raw_total, 1),
            "throughput_ratio_backend_over_raw": round(raw_total / backend_total, 3),
            "stored_bytes": ref["stored_bytes"],
        }
        log(f"  {store} {label}: backend {out[label]['backend_mib_s']} MiB/s, raw {out[label]['raw_mib_s']} MiB/s, "
            f"ratio {out[label]['throughput_ratio_backend_over_raw']}")
        del value, data
    return out


def rss_children(big: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ref_file = str(Path(d) / "ref.json")
        result = {}
        for mode in ("push", "pull", "raw_put", "raw_get"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--big-mib", str(big // MIB),
                                   "--ref-file", ref_file], capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            value_mib = big / MIB
            r["peak_over_value"] = round(r["peak_rss_mib"] / value_mib, 3)
            r["peak_minus_baseline_over_value"] = round((r["peak_rss_mib"] - r["baseline_rss_mib"]) / value_mib, 3)
            result[mode] = r
            log(f"  RSS {mode}: {r}")
        return result


def configure(store: str, servers: dict, workdir: Path, local_dir: Path, compression: str) -> None:
    from emulators import AWS_TEST_CREDENTIALS, azurite_connection_string

    os.environ["AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD"] = "0"
    os.environ["AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION"] = compression
    os.environ.pop("AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID", None)
    if store == "local":
        path = f"file://{local_dir}/xcom"
    elif store == "s3":
        os.environ["AIRFLOW_CONN_BENCH_S3"] = json.dumps(
            {"conn_type": "aws", "extra": {**AWS_TEST_CREDENTIALS, "endpoint_url": servers["s3"].url}})
        os.environ["AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID"] = "bench_s3"
        path = "s3://bench/xcom"
    elif store == "azure":
        os.environ["AIRFLOW_CONN_BENCH_AZ"] = json.dumps(
            {"conn_type": "wasb", "extra": {"connection_string": azurite_connection_string(servers["azure"])}})
        os.environ["AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID"] = "bench_az"
        path = "abfs://bench/xcom"
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = servers["gcs"].url
        path = "gs://bench/xcom"
    os.environ["AIRFLOW__REMOTE_EXECUTION__XCOM_PATH"] = path


def start_servers(stores: list[str], stack) -> dict:
    import emulators

    servers = {}
    if "s3" in stores:
        import boto3

        servers["s3"] = stack.enter_context(emulators.moto())
        boto3.client("s3", endpoint_url=servers["s3"].url, **emulators.AWS_TEST_CREDENTIALS).create_bucket(Bucket="bench")
    if "azure" in stores:
        from azure.storage.blob import BlobServiceClient

        servers["azure"] = stack.enter_context(emulators.azurite())
        BlobServiceClient.from_connection_string(emulators.azurite_connection_string(servers["azure"])
                                                 ).create_container("bench")
    if "gcs" in stores:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        servers["gcs"] = stack.enter_context(emulators.fake_gcs())
        storage.Client(project="bench", credentials=AnonymousCredentials(),
                       client_options={"api_endpoint": servers["gcs"].url}).create_bucket("bench")
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="local,s3", help="comma-separated: local, s3, azure, gcs")
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--compression", default="none", choices=["none", "gzip", "zstd"])
    parser.add_argument("--local-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else "",
                        help="where the local store lives (default /dev/shm: 256 MiB writes to a disk vary "
                             "several-fold from one to the next with write-back; pass a disk path to include it)")
    parser.add_argument("--child", choices=["push", "pull", "raw_put", "raw_get"], help=argparse.SUPPRESS)
    parser.add_argument("--ref-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    big = args.big_mib * MIB
    out = sys.stdout
    sys.stdout = sys.stderr  # Airflow and provider logs go to stdout: keep it for the JSON alone
    if args.child:
        sys.stdout = out
        child(args.child, big, args.ref_file)
        return

    import contextlib
    import platform

    for name in [k for k in os.environ if k.startswith("AIRFLOW")]:
        del os.environ[name]
    workdir = Path(tempfile.mkdtemp(prefix="rex-bench-xcom-"))
    local_dir = Path(tempfile.mkdtemp(prefix="rex-bench-xcom-", dir=args.local_dir or None))
    os.environ["AIRFLOW_HOME"] = str(workdir / "home")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    sizes = [1024, MIB, big]
    reps = {1024: 30, MIB: 10, big: 5}  # 256 MiB writes to a disk are noisy (write-back): 5 medians
    result = {"config": {"sizes_bytes": sizes, "reps": {str(k): v for k, v in reps.items()}, "threshold": 0,
                         "compression": args.compression, "cpus": os.cpu_count(), "python": platform.python_version(),
                         "value": "ASCII str (hex of random bytes)", "local_dir": str(local_dir)},
              "targets": TARGETS, "stores": {}}
    quiet()
    with contextlib.ExitStack() as stack:
        servers = start_servers(stores, stack)
        for store in stores:
            log(f"{store} ...")
            configure(store, servers, workdir, local_dir, args.compression)
            figures = measure(store, sizes, reps)
            figures["peak_rss"] = rss_children(big)
            big_label = f"{args.big_mib} MiB"
            figures["meets_target"] = {
                "throughput_ratio_at_256_mib": figures[big_label]["throughput_ratio_backend_over_raw"]
                >= TARGETS["throughput_ratio_at_256_mib"],
                **{f"peak_rss_{mode}": figures["peak_rss"][mode]["peak_minus_baseline_over_value"]
                   <= TARGETS["peak_rss_over_value"] for mode in ("push", "pull")},
            }
            result["stores"][store] = figures
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(local_dir, ignore_errors=True)
    print(json.dumps(result, indent=2), file=out)


if __name__ == "__main__":
    main()

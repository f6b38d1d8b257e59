"""``airflow remote-execution xcom gc``: delete orphaned XCom objects (see airflow_remote_execution.xcom.gc)."""

from __future__ import annotations

import json

from airflow.utils.providers_configuration_loader import providers_configuration_loaded


@providers_configuration_loaded
def xcom_gc(args) -> None:
    from airflow_remote_execution.plane.tokens import parse_duration
    from airflow_remote_execution.xcom import gc
    from airflow_remote_execution.xcom.store import Settings

    try:
        older_than = parse_duration(args.older_than)
        settings = Settings.from_config()
        if not settings.path:
            raise ValueError("[remote_execution] xcom_path is not set here: run gc where the agents' XCom config is")
    except ValueError as e:
        raise SystemExit(f"Error: {e}") from None
    source, live = gc.choose_live_source()
    result = gc.collect(settings, older_than, live, dry_run=args.dry_run)
    if args.output == "json":
        print(json.dumps({"dry_run": args.dry_run, "live_source": source, **result.__dict__}))
    else:
        verb = "Would delete" if args.dry_run else "Deleted"
        print(
            f"{settings.path}: {result.scanned} XCom objects, {result.old} older than {args.older_than}, "
            f"{result.kept_live} still referenced (asked the {source}); {verb} {len(result.deleted)}:"
        )
        for line in gc.summarize(result.deleted):
            print(f"  {line}")
        for err in result.errors:
            print(f"  error: {err}")
    if result.errors:
        raise SystemExit(1)

"""``airflow remote-execution check``: the doctor. One line per check, a hint on failure, exit 1 on any failure."""

from __future__ import annotations

import json

from airflow.utils.providers_configuration_loader import providers_configuration_loaded

from airflow_remote_execution import config
from airflow_remote_execution.agent.checks import CheckOptions, CheckResult, run_checks


def render(results: list[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        lines.append(f"{r.status:<4} {r.name:<{width}}  {r.detail}")
        if r.hint and (r.status in ("FAIL", "WARN")):
            lines.append(f"     {'':<{width}}  hint: {r.hint}")
    return "\n".join(lines)


@providers_configuration_loaded
def check(args) -> None:
    names = config.split_list(args.only) or None
    options = CheckOptions(probe_conn=args.probe_conn, probe_var=args.probe_var)
    try:
        results = run_checks(names, options)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.output == "json":
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(render(results))
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        raise SystemExit(1)

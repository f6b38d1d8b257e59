"""What an agent refuses to run, whatever the plane hands it.

* A workload of a DAG bundle the agent does not have (not in its ``[dag_processor]
  dag_bundle_config_list``): an error, not a warning. Airflow's supervisor would only log that it
  cannot initialise the bundle and go on to run a callback anyway.
* A callback whose import path names installed code (``os.system``, ``subprocess.run``) unless
  ``[remote_execution] parsed_dag_import_allowlist`` allows it: a callback must be the bundle's own code
  (the rule is ``wire/import_paths.py``, the same the plane applies to uploaded DAGs).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from airflow_remote_execution.wire import import_paths


@cache
def configured_bundles() -> frozenset[str]:
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    return frozenset(DagBundlesManager().get_all_bundle_names())


def refusal(kind: str, workload: dict[str, Any]) -> str | None:
    """Why this agent must not run ``workload`` (a leased ``ExecuteTask``/``ExecuteCallback`` as JSON),
    or None."""
    bundle = (workload.get("bundle_info") or {}).get("name")
    if kind in ("task", "callback") and bundle not in configured_bundles():
        return (
            f"DAG bundle {bundle!r} is not configured on this agent ([dag_processor] dag_bundle_config_list "
            f"has {', '.join(sorted(configured_bundles())) or 'none'}): add it there, or serve this queue "
            "from an agent that has it"
        )
    if kind == "callback":
        path = ((workload.get("callback") or {}).get("data") or {}).get("path")
        if why := import_paths.refusal(path, import_paths.allowlist()):
            return f"Refusing callback: {why}"
    return None

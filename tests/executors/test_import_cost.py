"""The api-server instantiates executors just to read logs: importing ours must add almost nothing."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from airflow.executors.local_executor import LocalExecutor
LocalExecutor()  # baseline: what any executor costs (BaseExecutor loads JWT signing, etc.)
before = set(sys.modules)
from airflow_remote_execution.executors import RemoteExecutor
RemoteExecutor()
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_executor_import_pulls_no_web_or_http_stack():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    added = json.loads(out.strip().splitlines()[-1])
    foreign = [m for m in added if not m.startswith("airflow_remote_execution")]
    assert foreign == [], f"RemoteExecutor costs more than LocalExecutor: it also imported {foreign}"
    assert not [m for m in added if m.split(".")[:2] in (["airflow_remote_execution", "api"], ["airflow_remote_execution", "agent"])]

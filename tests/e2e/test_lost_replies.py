"""
A reply lost on the network loses nothing: the plane committed the agent's start (or finish) report,
the answer never reached the agent. The agent sends the same report again under the same fence and
gets the same answer, so the task runs once and succeeds, with no retry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from localplane import Agent, Plane, shutdown

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
WORK = r"/remote_execution/v1/work/\d+"


def test_lost_start_and_finish_replies_lose_nothing(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / "remote_probe.py", dags)
    plane = Plane(tmp_path / "plane", dags_folder=dags)
    agent = proxy = None
    try:
        plane.start()
        proxy = FaultProxy([("127.0.0.1", plane.port)])
        agent = Agent("lossy", tmp_path / "agent", proxy.url, plane.create_agent_token("lossy", "probe"),
                      dags_folder=dags).start()
        agent.wait_registered()
        proxy.drop_replies("POST", f"{WORK}/start")
        proxy.drop_replies("POST", f"{WORK}/finish")

        run_id = plane.trigger("remote_probe")
        assert plane.wait_run("remote_probe", run_id, timeout=180) == "success"
        # Both replies were lost after the plane had answered them 200.
        assert [(method, path.rsplit("/", 1)[1], status) for method, path, status in proxy.dropped] == [
            ("POST", "start", 200), ("POST", "finish", 200),
        ]
        (ti,) = plane.task_instances("remote_probe", run_id)
        assert (ti["state"], ti["try_number"]) == ("success", 1)
        (item,) = plane.settled_work_items(dag_id="remote_probe", run_id=run_id)
        assert (item["state"], item["agent_name"], item["fence"]) == ("success", "lossy", 1)
        log = agent.proc.log_path.read_text(errors="replace")
        # The agent saw each loss and sent the same report again.
        assert "Confirming work" in log and "Reporting the outcome of work" in log
    finally:
        shutdown(plane, [agent])
        if proxy is not None:
            proxy.stop()

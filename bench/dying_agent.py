#!/usr/bin/env python
"""
An agent that dies between lease and start confirmation, for ``bench/chaos.py``.

With real agents that window lasts milliseconds (the confirmation follows the lease answer at once),
so random SIGKILLs almost never catch work that is leased but not started. This process is a real
agent identity on the real Remote Execution API, through the agent's own HTTP client: it registers,
long-polls for up to ``--slots`` work items, prints them as one JSON line and SIGKILLs itself. The
plane must give that work to live agents (lease_confirm_timeout, or lost-agent detection).

    python bench/dying_agent.py --url URL --token TOKEN [--slots 2] [--wait 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the plane's api-server URL")
    p.add_argument("--token", required=True)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--wait", type=float, default=10.0, help="long-poll wait (s)")
    args = p.parse_args()

    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.wire.api import RegisterRequest

    client = PlaneClient(args.url, args.token)
    client.register(RegisterRequest(concurrency=args.slots, hostname="dying-agent"))
    leases = client.lease(args.slots, args.wait)
    print(json.dumps({"t": time.time(), "leases": [{"id": w.work_id, "fence": w.fence} for w in leases]}), flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()

"""The agent worker process as a user starts it (``airflow remote-execution agent start``)."""

from __future__ import annotations

import http.server
import json
import subprocess

from emulators import LoopbackHttp
from localplane import Agent


def test_refused_registration_exits_with_the_reason(tmp_path):
    """A refused token ends the agent with the plane's reason; it must not hang at exit on its warm
    runners (non-daemon children that only leave when their parent does)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"detail": "Agent token revoked"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST

    with LoopbackHttp(Handler) as plane:
        agent = Agent("refused", tmp_path / "agent", plane.url, "not-a-valid-token", concurrency=2).start()
        try:
            code = agent.proc.popen.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not exit:\n{agent.proc.tail()}") from None
        finally:
            agent.proc.stop()
    assert code != 0
    assert "Agent registration refused: Agent token revoked" in agent.proc.tail()

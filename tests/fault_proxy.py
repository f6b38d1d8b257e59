"""A reverse proxy for tests that loses chosen replies, or balances over several upstreams.

Agents point their ``api_url`` at it. Every request is relayed to an upstream plane. For a request
whose method and path match a rule with drops left, the request *is* relayed and answered by the plane,
but the proxy then closes the agent's connection without sending the answer: exactly what a reply lost
on the network looks like to the agent (the plane has committed; the agent does not know).

With several upstreams, each new agent connection goes to the next live one (round robin), so agents
reach every api-server; an upstream that refuses connections is skipped.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # an agent that went away (restart, timeout): expected
        pass


class FaultProxy:
    def __init__(self, upstreams: list[tuple[str, int]]):
        self.upstreams = upstreams
        self.rules: list[list] = []  # [method, compiled path pattern, drops left]
        self.dropped: list[tuple[str, str, int]] = []  # (method, path, upstream status) of each lost reply
        self.relayed: dict[int, int] = {}  # upstream index -> requests relayed
        self._next = count()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPConnection | None = None
            upstream_index = -1

            def log_message(self, *args):
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                for attempt in range(len(proxy.upstreams) + 1):
                    if self.upstream is None:
                        self.upstream_index, self.upstream = proxy._connect()
                    try:
                        self.upstream.request(self.command, self.path, body=body, headers=headers)
                        response = self.upstream.getresponse()
                        data = response.read()
                        break
                    except (ConnectionError, http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt == len(proxy.upstreams):
                            self.close_connection = True
                            return
                with proxy._lock:
                    proxy.relayed[self.upstream_index] = proxy.relayed.get(self.upstream_index, 0) + 1
                if proxy._drop(self.command, self.path, response.status):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # the answer is lost on the way back
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def drop_replies(self, method: str, path_pattern: str, times: int = 1) -> None:
        """Lose the reply of the next ``times`` requests matching (``path_pattern`` is a regex, full match)."""
        with self._lock:
            self.rules.append([method, re.compile(path_pattern), times])

    def _drop(self, method: str, path: str, status: int) -> bool:
        with self._lock:
            for rule in self.rules:
                if rule[0] == method and rule[1].fullmatch(path.split("?")[0]) and rule[2] > 0:
                    rule[2] -= 1
                    self.dropped.append((method, path, status))
                    return True
        return False

    def _connect(self) -> tuple[int, http.client.HTTPConnection]:
        for _ in range(len(self.upstreams)):
            index = next(self._next) % len(self.upstreams)
            host, port = self.upstreams[index]
            conn = http.client.HTTPConnection(host, port, timeout=180)
            try:
                conn.connect()
                return index, conn
            except OSError:
                conn.close()
        raise ConnectionRefusedError("no upstream is up")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

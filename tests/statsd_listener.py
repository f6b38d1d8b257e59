"""A real StatsD receiver on loopback UDP: records every line (``name:value|type``) it is sent."""

from __future__ import annotations

import socket
import threading
import time


class StatsdListener:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.lines.extend(line for line in data.decode(errors="replace").splitlines() if line)

    def env(self, prefix: str = "airflow") -> dict[str, str]:
        """Airflow's own [metrics] settings that send to this listener."""
        return {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(self.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": prefix,
        }

    def metrics(self) -> list[tuple[str, float, str]]:
        """Every (name, value, type) received so far."""
        out = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            try:
                out.append((name, float(value), kind.split("|")[0]))
            except ValueError:
                continue
        return out

    def names(self) -> set[str]:
        return {name for name, _, _ in self.metrics()}

    def values(self, name: str) -> list[float]:
        return [v for n, v, _ in self.metrics() if n == name]

    def last(self, name: str) -> float | None:
        values = [v for n, v, _ in self.metrics() if n == name]
        return values[-1] if values else None

    def wait_for(self, name: str, timeout: float = 10.0, value: float | None = None) -> float:
        """The last value of ``name`` once one arrived (with ``value``: once the last one is that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last(name)
            if last is not None and (value is None or last == value):
                return last
            time.sleep(0.05)
        raise AssertionError(
            f"no {name}{'' if value is None else f' = {value}'} at the StatsD listener (last: {self.last(name)}); "
            f"got {sorted(self.names())[:80]}"
        )

    def clear(self) -> None:
        with self._lock:
            self.lines.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

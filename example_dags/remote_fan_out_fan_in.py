"""Fan-out/fan-in on agents: mapped tasks pass values to a reducer through XCom."""

from __future__ import annotations

import socket

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False, tags=["remote-execution", "example"])
def remote_fan_out_fan_in():
    @task
    def numbers() -> list[int]:
        return list(range(1, 6))

    @task
    def square(n: int) -> int:
        print(f"squaring {n} on {socket.gethostname()}")
        return n * n

    @task
    def total(squares: list[int]) -> int:
        result = sum(squares)
        assert result == 55, f"expected 55, got {result}"
        return result

    total(square.expand(n=numbers()))


remote_fan_out_fan_in()

"""
Agent-side checks: one registry that ``airflow remote-execution check`` (the doctor) and the
sentinel both run. A check is a function returning a :class:`CheckResult`; raising counts as a
failure whose detail is the exception. Register with ``@check("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

CheckFn = Callable[[], "CheckResult"]
CHECKS: dict[str, CheckFn] = {}


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""  # what to fix; shown on failure
    skipped: bool = False  # not configured here: neither pass nor fail

    def as_dict(self) -> dict:
        return asdict(self)


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    def register(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn

    return register


def run_checks(names: list[str] | None = None) -> list[CheckResult]:
    results = []
    for name in names or list(CHECKS):
        try:
            results.append(CHECKS[name]())
        except Exception as e:  # noqa: BLE001 - a broken check is a failed check, never a crash
            results.append(CheckResult(name, False, f"{type(e).__name__}: {e}"))
    return results

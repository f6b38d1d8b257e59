"""Deadline callback of ``deadline_missed`` (remote_watchers_and_deadlines.py): copied into the triggerer's
plugins folder, which is on its sys.path. Writes where it ran."""

from __future__ import annotations

import os
from pathlib import Path


async def on_deadline(marker: str, **_kwargs) -> str:
    Path(marker).write_text(os.environ.get("AIRFLOW_HOME", "?"))
    return "called"

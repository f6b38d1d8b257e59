"""Callables for deadline alerts; they run on an agent (the DAG bundle is on ``sys.path`` there)."""

from __future__ import annotations


def on_deadline_missed(context=None, **kwargs) -> None:
    # Send a page, open a ticket... from inside your own infrastructure. Here: a log line.
    print(f"Deadline missed: {kwargs.get('note')} (context keys: {sorted(context or {})})")

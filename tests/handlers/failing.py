"""Test handler that raises on every message (crash-loop test)."""

from supervisor.record import Record


def process(record: Record) -> None:
    raise RuntimeError(f"cannot handle {record.coordinates}")

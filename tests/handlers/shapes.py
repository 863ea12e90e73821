"""Test handlers of every shape: async, batch, and the class form with its lifecycle. Each
records to KSUP_TEST_RECORD like recording.py; the class also writes its lifecycle calls."""

from __future__ import annotations

import asyncio
import os

from supervisor.record import Record

_RECORD = os.environ["KSUP_TEST_RECORD"]
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _write(record: Record, tag: str = "") -> None:
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}{tag}\n".encode())


async def process_async(record: Record) -> None:
    await asyncio.sleep(0.001)
    _write(record)


BATCHES = _RECORD + ".batches"


def process_batch(records: list[Record]) -> None:
    with open(BATCHES, "a") as f:
        f.write(f"{len(records)}\n")
    for r in records:
        _write(r)


class Lifecycle:
    """setup -> on_assign -> process... -> on_revoke -> teardown, each written to <record>.life."""

    def __init__(self) -> None:
        self.life = open(_RECORD + ".life", "a", buffering=1)

    def setup(self) -> None:
        self.life.write(f"{os.getpid()} setup\n")

    def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self.life.write(f"{os.getpid()} assign {sorted(p for _, p in partitions)}\n")

    def process(self, record: Record) -> None:
        _write(record)

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.life.write(f"{os.getpid()} revoke {sorted(p for _, p in partitions)}\n")

    def teardown(self) -> None:
        self.life.write(f"{os.getpid()} teardown\n")


def process_fields(record: Record) -> None:
    """Writes ``offset headers hashed`` (the headers' repr; whether the record hashes to itself)."""
    hashed = {record: 1}[record]  # raises TypeError if any field is mutable
    os.write(_fd, f"{record.offset} {record.headers!r} {hashed}\n".encode())


def process_fields_batch(records: list[Record]) -> None:
    for r in records:
        process_fields(r)

"""Test handler (class form) that is its own witness of the group's rebalances: every message
goes through tests/handlers/recording.py (the line ``partition offset pid`` in KSUP_TEST_RECORD,
with all its failure switches), and every on_assign / on_revoke ksup calls is appended to
``<KSUP_TEST_RECORD>.rebalances`` as ``pid assign|revoke p,p,...`` (one write per line, with
O_APPEND: whole or absent). ksup calls on_revoke for revoked and for lost partitions alike, and
calls neither hook with no partitions, so each line is one real change of this member's
assignment. Each finished message also gets ``partition offset wall-time`` in
``<KSUP_TEST_RECORD>.times``, from which the tests measure the longest gap of a partition."""

from __future__ import annotations

import os
import time

from supervisor.record import Record
from tests.handlers import recording

EVENTS = recording._RECORD + ".rebalances"
TIMES = recording._RECORD + ".times"


class Witness:
    def __init__(self) -> None:
        self.fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.times = os.open(TIMES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _write(self, what: str, partitions: list[tuple[str, int]]) -> None:
        names = ",".join(str(p) for p in sorted(p for _, p in partitions))
        os.write(self.fd, f"{os.getpid()} {what} {names}\n".encode())

    def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self._write("assign", partitions)

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self._write("revoke", partitions)

    def process(self, record: Record) -> None:
        recording.process(record)
        os.write(self.times, f"{record.partition} {record.offset} {time.time():.4f}\n".encode())

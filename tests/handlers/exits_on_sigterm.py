"""Test handler (class form) whose setup() does what some libraries do: SIGTERM becomes an
immediate exit 0 (os._exit: no drain, no exit report). Records like recording.py."""

from __future__ import annotations

import os
import signal
import time

from supervisor.record import Record

_fd = os.open(os.environ["KSUP_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class Handler:
    def setup(self) -> None:
        signal.signal(signal.SIGTERM, lambda _sig, _frame: os._exit(0))

    def process(self, record: Record) -> None:
        time.sleep(0.01)
        os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\n".encode())

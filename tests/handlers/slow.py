"""Test handler that takes KSUP_TEST_SLEEP seconds (default 30) per message and records it."""

import os
import time

from supervisor.record import Record

_SLEEP = float(os.environ.get("KSUP_TEST_SLEEP", "30"))
_fd = os.open(os.environ["KSUP_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def process(record: Record) -> None:
    time.sleep(_SLEEP)
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\n".encode())

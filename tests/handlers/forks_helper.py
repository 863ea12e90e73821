"""Test handler: records like recording.py; on message 0:3 it forks a helper (fork, no exec, as
multiprocessing's fork start method does) that adds its pid to a file next to the record (a
redelivered 0:3 forks another) and sleeps."""

from __future__ import annotations

import os
import time

from supervisor.record import Record

_RECORD = os.environ["KSUP_TEST_RECORD"]
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def process(record: Record) -> None:
    if (record.partition, record.offset) == (0, 3) and os.fork() == 0:
        fd = os.open(_RECORD + ".helpers", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        time.sleep(3600)
        os._exit(0)
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\n".encode())

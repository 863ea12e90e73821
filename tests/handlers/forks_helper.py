"""Test handler: records like recording.py; on message 0:3 it forks a helper (fork, no exec, as
multiprocessing's fork start method does) that writes its pid next to the record and sleeps."""

from __future__ import annotations

import os
import time

from supervisor.record import Record

_RECORD = os.environ["KSUP_TEST_RECORD"]
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def process(record: Record) -> None:
    if (record.partition, record.offset) == (0, 3) and os.fork() == 0:
        with open(_RECORD + ".helper.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(_RECORD + ".helper.tmp", _RECORD + ".helper")
        time.sleep(3600)
        os._exit(0)
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\n".encode())

"""Benchmark handler: records ``partition offset pid monotonic_ns`` per message (and sleeps
BENCH_SLEEP seconds), so gaps in a partition's processing can be measured afterwards."""

import os
import time

from supervisor.record import Record

_SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
_fd = os.open(os.environ["BENCH_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def process(record: Record) -> None:
    if _SLEEP:
        time.sleep(_SLEEP)
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()} {time.monotonic_ns()}\n".encode())

"""Benchmark handlers that do nothing but note when the first and the BENCH_COUNT-th message
were done (written to BENCH_OUT: pid, two monotonic timestamps, the count, and the worker
process's CPU seconds, all threads, between the two)."""

import os
import time

from supervisor.record import Record

_COUNT = int(os.environ.get("BENCH_COUNT", "0"))
_OUT = os.environ.get("BENCH_OUT", "")
_SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
_seen = 0
_first = 0.0
_first_cpu = 0.0


def _tick(n: int) -> None:
    global _seen, _first, _first_cpu
    if _seen == 0:
        _first, _first_cpu = time.monotonic(), time.process_time()
    before = _seen
    _seen += n
    if before < _COUNT <= _seen and _OUT:  # once, when the count is reached
        with open(_OUT, "a") as f:
            f.write(f"{os.getpid()} {_first} {time.monotonic()} {_seen} {time.process_time() - _first_cpu}\n")


def process(record: Record) -> None:
    if _SLEEP:
        time.sleep(_SLEEP)
    _tick(1)


def process_batch(records: list[Record]) -> None:
    _tick(len(records))

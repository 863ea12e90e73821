"""Benchmark handlers that do nothing but note when the first and the BENCH_COUNT-th message
were done (written to BENCH_OUT: pid, two monotonic timestamps, the count, and the worker
process's CPU seconds, all threads, between the two).

With BENCH_PARTITION_END=N (several workers, a topic of N messages per partition) the line is
written when a partition's last message (offset N-1) is done, with the partition appended: the
work is then whole however the group spreads (or moves) the partitions over the workers."""

import os
import time

from supervisor.record import Record

_COUNT = int(os.environ.get("BENCH_COUNT", "0"))
_OUT = os.environ.get("BENCH_OUT", "")
_SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
_PARTITION_LAST = int(os.environ.get("BENCH_PARTITION_END", "0")) - 1
_seen = 0
_first = 0.0
_first_cpu = 0.0


def _tick(n: int) -> None:
    global _seen, _first, _first_cpu
    if _seen == 0:
        _first, _first_cpu = time.monotonic(), time.process_time()
    before = _seen
    _seen += n
    if before < _COUNT <= _seen and _OUT and _PARTITION_LAST < 0:  # once, when the count is reached
        with open(_OUT, "a") as f:
            f.write(f"{os.getpid()} {_first} {time.monotonic()} {_seen} {time.process_time() - _first_cpu}\n")


def process(record: Record) -> None:
    if _SLEEP:
        time.sleep(_SLEEP)
    _tick(1)
    if record.offset == _PARTITION_LAST and _OUT:
        with open(_OUT, "a") as f:
            f.write(f"{os.getpid()} {_first} {time.monotonic()} {_seen} {time.process_time() - _first_cpu} "
                    f"{record.partition}\n")


def process_batch(records: list[Record]) -> None:
    _tick(len(records))
